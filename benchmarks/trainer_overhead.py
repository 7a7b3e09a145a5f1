"""Per-step overhead of ``LLM2CLIPTrainer`` over a bare PyTorch loop doing the same stage-2 step.

Both train the same model (stage 2, cached text embeddings, small EVA02 tower) on the same dataset with the same
collator (``trainer.data_collator``: image transform, caption choice, embedding lookup), batch size and random
sampling; both run forward, ``CLIPContrastiveLoss``, backward, gradient clipping to ``max_grad_norm``, AdamW with
the trainer's parameter groups (layer decay, no decay on norms/biases) and fused setting, the cosine schedule,
the ``logit_scale`` clamp and ``zero_grad``. A step is timed end to end (end of one step to the end of the next,
the batch fetch included) in blocks of steps that alternate between the two loops; the result is the ratio of
the median step times.

Full run: SmolLM2-135M-Instruct embeddings of emoji captions, EVA02 image 64 / patch 8 / width 192 / depth 4,
batch 32. ``--quick``: tiny LLM and tower, synthetic rows, batch 8.
"""

from __future__ import annotations

import math
import time

import _common as bench
import torch
from torch.utils.data import DataLoader

from llm2clip_hf import LLM2CLIPModel
from llm2clip_hf.data import ROW_INDEX, precompute_text_embeddings
from llm2clip_hf.trainers import CLIPContrastiveLoss, LLM2CLIPTrainer, layer_decay_parameter_groups
from llm2clip_hf.data.data_statistics import BATCH_STATISTICS

CAPTIONS = ["short_caption", "long_caption"]


def bare_loop_block(trainer: LLM2CLIPTrainer, steps: int):
    """A block of ``steps`` plain-PyTorch steps on the trainer's model, data and collator (see module doc)."""
    args = trainer.args
    model = trainer.model
    loss_fn = CLIPContrastiveLoss()
    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(trainer.train_dataset, batch_size=args.per_device_train_batch_size, shuffle=True,
                        collate_fn=trainer.data_collator, generator=generator, num_workers=0)
    groups = layer_decay_parameter_groups(model, args.learning_rate, args.weight_decay, args.layer_decay,
                                          model.config.vision_config.num_hidden_layers)
    fused = "fused" in str(getattr(args.optim, "value", args.optim))
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  eps=args.adam_epsilon, fused=fused)
    total = args.max_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)))

    def run() -> list[float]:
        intervals: list[float] = []
        last = None
        model.train()
        for index, batch in enumerate(loader):
            if index == steps:
                break
            batch.pop(ROW_INDEX, None)  # the collator names each row for error messages; the model takes none
            batch.pop(BATCH_STATISTICS, None)  # and counts skipped rows / truncated captions for the trainer
            outputs = model(**batch)
            loss = loss_fn(outputs.image_embeds, outputs.text_embeds, model.logit_scale)
            loss.backward()
            # The Trainer keeps neither the outputs nor the loss graph past the backward; holding them until the next
            # step changes glibc's heap trimming (measured: ~3x fewer page faults, ~10% faster steps), which would be
            # credited to the Trainer as overhead.
            del outputs, loss
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0.0, args.logit_scale_max)
            scheduler.step()
            model.zero_grad()
            now = time.perf_counter()
            if last is not None:
                intervals.append(now - last)
            last = now
        return intervals

    return run, fused


def main() -> None:
    args = bench.build_parser(__doc__).parse_args()
    bench.quiet()
    quick = args.quick
    batch, steps, rounds = (8, 6, 3) if quick else (32, 10, 6)
    text_model = bench.load_benchmark_text_model(quick)
    rows = bench.image_caption_rows(quick, batch * steps)  # a block is one epoch of the trainer
    cached = precompute_text_embeddings(rows, text_model, CAPTIONS)
    torch.manual_seed(0)
    model = LLM2CLIPModel.from_text_model(text_model, bench.stage2_vision_config(quick), embed_text_model=False,
                                          projection_dim=32 if quick else 256)
    trainer = LLM2CLIPTrainer(model=model, args=bench.stage2_args(bench.scratch_dir(), batch, steps),
                              train_dataset=cached, text_model=text_model)
    bare, fused = bare_loop_block(trainer, steps)
    intervals = bench.time_loops_interleaved({"LLM2CLIPTrainer": bench.trainer_block(trainer), "bare loop": bare},
                                             rounds=rounds, warmup_rounds=1)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    if type(inner) is not torch.optim.AdamW or bool(inner.defaults.get("fused")) != fused:
        raise RuntimeError(f"the trainer used {type(inner).__name__} (fused={inner.defaults.get('fused')}); the "
                           f"bare loop AdamW (fused={fused}) would not do the same work")

    step = {name: bench.median(values) for name, values in intervals.items()}
    ratio = step["LLM2CLIPTrainer"] / step["bare loop"]
    print(f"stage 2 (cached embeddings), batch {batch}, {steps} steps per block x {rounds} rounds after 1 warmup "
          f"round, torch threads {torch.get_num_threads()}, AdamW fused={fused}")
    rows_out = [[name, f"{1000 * step[name]:.2f}", f"{step[name] / step['bare loop']:.3f}x", len(values),
                 f"{1000 * min(values):.2f}", f"{1000 * max(values):.2f}"] for name, values in intervals.items()]
    bench.print_table("median step time", ["loop", "ms/step", "vs bare", "steps timed", "min ms", "max ms"],
                      rows_out)
    print(f"\noverhead: {100 * (ratio - 1):+.1f}% per step")
    bench.print_ratio(bench.ratio_text("trainer/bare step time", ratio, 1.05, higher_is_better=False, quick=quick))
    bench.write_json(args.output, {
        "benchmark": "trainer_overhead", "quick": quick, "batch_size": batch, "torch_threads": torch.get_num_threads(),
        "step_seconds": intervals, "median_step_seconds": step, "ratio_trainer_over_bare": ratio,
        "overhead_percent": 100 * (ratio - 1), "target_ratio": 1.05,
    })


if __name__ == "__main__":
    main()
