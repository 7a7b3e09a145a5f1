"""What DeepSpeed changes for this package: settings that would silently change a run are refused, and models are
built whole while ZeRO-3 is configured (DeepSpeed partitions them when the Trainer starts it)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .training_args import CLIP_STAGE, LLM2CLIPTrainingArguments


def check_deepspeed_config(config: dict[str, Any], args: LLM2CLIPTrainingArguments) -> None:
    """Refuse DeepSpeed settings under which the run would silently differ from what ``args`` ask for."""
    zero = config.get("zero_optimization", {})
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise ValueError(
            "DeepSpeed ZeRO-3 without stage3_gather_16bit_weights_on_model_save: the final save would hold only "
            "DeepSpeed's shards, no model that from_pretrained loads. Set \"stage3_gather_16bit_weights_on_model_save\": "
            "true under \"zero_optimization\" (accelerate config: zero3_save_16bit_model: true)."
        )
    if "optimizer" in config and args.stage == CLIP_STAGE and (args.layer_decay != 1 or args.weight_decay != 0):
        raise ValueError(
            "The DeepSpeed config has an \"optimizer\" section, so DeepSpeed builds the optimizer with one learning "
            "rate and one weight decay for every parameter: the vision tower's layer-wise lr decay (layer_decay="
            f"{args.layer_decay}) and the parameters kept free of weight decay (biases, norms, embeddings, logit_scale; "
            f"weight_decay={args.weight_decay}) would be lost. Remove the \"optimizer\" section (the trainer then builds "
            "its optimizer, --optim, and DeepSpeed runs it), or set layer_decay=1 and weight_decay=0."
        )


@contextmanager
def models_built_whole() -> Iterator[None]:
    """Build models whole while ZeRO-3 training arguments exist. transformers then builds every model inside
    DeepSpeed's ``zero.Init``, which cannot partition this package's models (the 0-d ``logit_scale``; weights
    loaded after the LLM is built); built whole, DeepSpeed partitions them when the Trainer starts it. Each process
    holds one whole copy until then (as with accelerate's ``zero3_init_flag: false``)."""
    import transformers.integrations.deepspeed as hf_deepspeed

    if not hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    # transformers' switch is a module-level weak reference to the run's DeepSpeed config (owned by the arguments or
    # accelerate's plugin, so it stays alive): cleared while building, put back afterwards.
    reference = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = reference
