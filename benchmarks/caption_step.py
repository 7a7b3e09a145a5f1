"""Stage-1 step time: query, positive and hard negative in one LLM forward (the trainer's collator) against three
forwards, one per role (the trainer before issue 13).

Both run forward, ``CaptionContrastiveLoss`` and backward on the same LoRA'd model and the same rows, timed
round-robin; the ratio is of median step times. The three-pass side tokenizes each role's texts as their own
left-padded batch. Full run: SmolLM2-135M-Instruct, demo emoji caption triples, batch 32. ``--quick``: tiny LLM.
"""

from __future__ import annotations

import _common as bench
import torch

from llm2clip_hf.modeling.caption_tokenization import collate_left_padded
from llm2clip_hf.testing import tiny_caption_pair_rows
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments
from llm2clip_hf.data.text_pairs import ROLES, TEXTS, split_roles


def caption_rows(quick: bool):
    from datasets import Dataset

    if quick:
        return Dataset.from_list(tiny_caption_pair_rows())
    from llm2clip_hf.demo.emoji_dataset import load_emoji_dataset

    return load_emoji_dataset()["train"]


def main() -> None:
    args = bench.build_parser(__doc__).parse_args()
    bench.quiet()
    batch_size, repeats = (8, 3) if args.quick else (32, 5)
    text_model = bench.load_benchmark_text_model(args.quick, max_length=128)
    training = LLM2CLIPTrainingArguments(output_dir=str(bench.scratch_dir() / "caption_step"), stage="caption",
                                         per_device_train_batch_size=batch_size, use_cpu=True, report_to="none",
                                         lora_dropout=0.0)
    trainer = LLM2CLIPTrainer(model=text_model, args=training, train_dataset=caption_rows(args.quick))
    model = trainer.model
    model.train()
    rows = [trainer.train_dataset[i] for i in range(batch_size)]
    batch = trainer.data_collator(rows)
    pad = text_model.tokenizer.pad_token_id
    texts = batch[TEXTS]
    per_role = {role: {k: v[i * batch_size:(i + 1) * batch_size] for k, v in texts.items()}
                for i, role in enumerate(batch[ROLES])}
    # re-pad each role to its own longest text, as a per-role collator did
    per_role = {role: collate_left_padded(list(_unpadded(role_batch)), pad) for role, role_batch in per_role.items()}
    losses = {}

    def one_forward() -> None:
        model.zero_grad()
        embeddings = split_roles(model(**texts).text_embeds, batch[ROLES])
        loss = trainer.loss(embeddings["query"], embeddings["positive"], embeddings["negative"])
        loss.backward()
        losses["one forward"] = loss.item()

    def three_forwards() -> None:
        model.zero_grad()
        embeddings = {role: model(**inputs).text_embeds for role, inputs in per_role.items()}
        loss = trainer.loss(embeddings["query"], embeddings["positive"], embeddings["negative"])
        loss.backward()
        losses["three forwards"] = loss.item()

    times = bench.time_interleaved({"one forward": one_forward, "three forwards": three_forwards},
                                   repeats=repeats, warmup=1)
    step = {name: bench.median(values) for name, values in times.items()}
    widths = {role: inputs["input_ids"].shape[1] for role, inputs in per_role.items()}
    print(f"batch {batch_size} rows x 3 roles, text model {text_model.name_or_path}, torch threads "
          f"{torch.get_num_threads()}; one batch {tuple(texts['input_ids'].shape)}, per role {widths}")
    bench.print_table(f"seconds per step (forward + loss + backward), median of {repeats} alternating repeats",
                      ["LLM passes", "s/step", "loss"],
                      [[name, f"{step[name]:.3f}", f"{losses[name]:.5f}"] for name in step])
    difference = abs(losses["one forward"] - losses["three forwards"])
    print(f"\n|loss difference| = {difference:.2e}")
    ratio = step["three forwards"] / step["one forward"]
    bench.print_ratio(bench.ratio_text("three-pass/one-pass step time", ratio, 1.0, quick=args.quick))
    bench.write_json(args.output, {
        "benchmark": "caption_step", "quick": args.quick, "batch_size": batch_size, "seconds": times,
        "median_step_seconds": step, "loss_difference": difference, "ratio_three_over_one": ratio, "target": 1.0,
    })
    if difference > 1e-3:
        raise SystemExit(f"FAILED: the two ways give different losses ({difference:.2e})")


def _unpadded(batch: dict[str, torch.Tensor]):
    """The TokenizedText-like items of a left-padded batch (ids without padding, pooled-token count)."""
    from types import SimpleNamespace

    for ids, attention, pooling in zip(batch["input_ids"], batch["attention_mask"], batch["pooling_mask"]):
        yield SimpleNamespace(input_ids=ids[attention.bool()].tolist(), num_pooled=int(pooling.sum()))


if __name__ == "__main__":
    main()
