"""EVA02 vision tower speed vs transformers' CLIPVisionModel (SDPA attention) of the same shape.

Both towers get the same width, depth, heads, image and patch size. The MLPs have equal weight counts: EVA02's
SwiGLU (three matrices) uses ``intermediate = 8/3 * width`` (2048 at width 768, as EVA02-B), CLIP's GELU MLP (two
matrices) ``4 * width`` (3072). EVA02 additionally computes 2-D RoPE, the attention sub-LayerNorm and ``ffn_ln``.
Images/s is measured for inference (``eval``, ``no_grad``) and for training (forward + backward of the pooled
output); the two towers alternate call by call, and the median over the repeats after warmup is used.

Full run: width 768, depth 12, heads 12, image 224, patch 16, batch 8 (ViT-B/16). ``--quick``: a tiny tower.
"""

from __future__ import annotations

import _common as bench
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from llm2clip_hf import EVA02VisionConfig, EVA02VisionModel


def build_towers(width: int, depth: int, heads: int, image: int, patch: int) -> dict[str, torch.nn.Module]:
    """EVA02 and CLIP towers of one shape, random weights, float32."""
    torch.manual_seed(0)
    eva = EVA02VisionModel(EVA02VisionConfig(
        image_size=image, patch_size=patch, hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
        intermediate_size=int(width * 8 / 3)))
    clip = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth, num_attention_heads=heads,
        image_size=image, patch_size=patch, attn_implementation="sdpa"))
    return {"eva02": eva, "clip": clip}


def inference_call(model: torch.nn.Module, pixels: torch.Tensor):
    """One no-grad eval forward."""
    def run() -> None:
        model.eval()
        with torch.no_grad():
            model(pixel_values=pixels).pooler_output
    return run


def training_call(model: torch.nn.Module, pixels: torch.Tensor):
    """One train-mode forward + backward of the pooled output (gradients dropped afterwards)."""
    def run() -> None:
        model.train()
        model(pixel_values=pixels).pooler_output.square().mean().backward()
        model.zero_grad(set_to_none=True)
    return run


def main() -> None:
    args = bench.build_parser(__doc__).parse_args()
    bench.quiet()
    if args.quick:
        width, depth, heads, image, patch, batch, repeats = 64, 2, 2, 32, 8, 4, 5
    else:
        width, depth, heads, image, patch, batch, repeats = 768, 12, 12, 224, 16, 8, 5
    towers = build_towers(width, depth, heads, image, patch)
    pixels = torch.randn(batch, 3, image, image)
    params = {name: sum(p.numel() for p in model.parameters()) for name, model in towers.items()}

    results: dict[str, dict[str, list[float]]] = {}
    for mode, make in (("forward (eval, no_grad)", inference_call), ("forward+backward (train)", training_call)):
        results[mode] = bench.time_interleaved({name: make(model, pixels) for name, model in towers.items()},
                                               repeats=repeats, warmup=1)

    print(f"width {width}, depth {depth}, heads {heads}, image {image}, patch {patch}, batch {batch}, "
          f"torch threads {torch.get_num_threads()}; parameters EVA02 {params['eva02'] / 1e6:.2f}M, "
          f"CLIP {params['clip'] / 1e6:.2f}M")
    rows, ratios = [], {}
    for mode, times in results.items():
        speed = {name: batch / bench.median(values) for name, values in times.items()}
        ratios[mode] = speed["eva02"] / speed["clip"]
        rows.append([mode, f"{speed['eva02']:.2f}", f"{speed['clip']:.2f}", f"{ratios[mode]:.3f}x",
                     len(times["eva02"])])
    bench.print_table(f"images/s, median of {repeats} alternating repeats after 1 warmup",
                      ["mode", "EVA02", "CLIP (sdpa)", "EVA02/CLIP", "repeats"], rows)
    forward, training = ratios["forward (eval, no_grad)"], ratios["forward+backward (train)"]
    print(f"also: EVA02/CLIP forward+backward = {training:.3g}x")
    bench.print_ratio(bench.ratio_text("EVA02/CLIP forward images/s", forward, 0.9, quick=args.quick))
    bench.write_json(args.output, {
        "benchmark": "eva02_speed", "quick": args.quick,
        "shape": dict(width=width, depth=depth, heads=heads, image=image, patch=patch, batch=batch),
        "parameters": params, "torch_threads": torch.get_num_threads(), "seconds": results,
        "ratio_eva02_over_clip": ratios, "target": 0.9,
    })


if __name__ == "__main__":
    main()
