"""Training arguments for both LLM2CLIP stages, defaulting to the official settings of each stage."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import TrainingArguments
from transformers.utils import logging as hf_logging

logger = hf_logging.get_logger(__name__)

MNTP_STAGE, CAPTION_STAGE, CLIP_STAGE = "mntp", "caption", "clip"
TEXT_STAGES = (MNTP_STAGE, CAPTION_STAGE)  # stages that train an LLM2CLIPTextModel
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

OFFICIAL_SHORT_QUERY_INSTRUCTION = "Given a sentence, retrieve a detailed relevant sentence"
OFFICIAL_LONG_QUERY_INSTRUCTION = "Given a detailed sentence, retrieve a short relevant sentence"
# Official settings that differ between the stages (llm_caption_contrastive configs / llm2clip run.sh).
STAGE_DEFAULTS = {
    MNTP_STAGE: dict(learning_rate=5e-5, warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                     lr_scheduler_type="linear"),
    CAPTION_STAGE: dict(learning_rate=2e-4, warmup_steps=300, weight_decay=0.0, max_grad_norm=1.0,
                        lr_scheduler_type="linear", short_query_instruction=OFFICIAL_SHORT_QUERY_INSTRUCTION,
                        long_query_instruction=OFFICIAL_LONG_QUERY_INSTRUCTION, loss_centering=False),
    CLIP_STAGE: dict(learning_rate=1e-5, warmup_steps=0, weight_decay=0.05, max_grad_norm=5.0,
                     lr_scheduler_type="cosine", logit_scale_max=math.log(100.0)),
}
# A default warmup never takes more than this share of the run (the official 300 steps are ~5 % of its one epoch;
# a 150-step run would otherwise never reach its learning rate). A quarter, not less: 2 warmup steps of a 20-step
# run at lr 4e-3 collapsed SmolLM2's embeddings to one point (loss ln(batch)), 5 did not (docs/results.md; at 4e-3 a
# collapse also came with 10 of 40, hence 2e-3 for small LLMs).
MAX_DEFAULT_WARMUP_SHARE = 0.25
# The text stages on LLMs under SMALL_LLM_PARAMETERS: measured on SmolLM2-135M (docs/results.md, docs/stage1.md);
# they replace the official values only where those were left unset.
SMALL_LLM_PARAMETERS = 1_000_000_000
SMALL_LLM_DEFAULTS = {
    MNTP_STAGE: dict(learning_rate=1e-3),
    CAPTION_STAGE: dict(learning_rate=2e-3, short_query_instruction="", long_query_instruction="",
                        loss_centering=True),
}


@dataclass
class LLM2CLIPTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the settings of LLM2CLIP's two contrastive stages.

    ``stage="caption"`` fine-tunes an :class:`LLM2CLIPTextModel` with LoRA on caption pairs; ``stage="clip"``
    trains an :class:`LLM2CLIPModel`'s vision tower, adapter and ``logit_scale``. Learning rate, warmup,
    weight decay, gradient clipping and schedule default to the official values of the chosen stage when left
    unset.

    Example:
        ```python
        from llm2clip_hf.trainers import LLM2CLIPTrainingArguments

        args = LLM2CLIPTrainingArguments("stage2", stage="clip")  # the official stage-2 settings where left unset
        print(args.learning_rate, args.weight_decay, args.max_grad_norm, args.layer_decay)
        ```
    """

    stage: Literal["mntp", "caption", "clip"] = field(default=CAPTION_STAGE, metadata={
        "help": "mntp (masked next-token prediction, before stage 1), caption (stage 1) or clip (stage 2)."})
    # ---- stage "mntp"
    mlm_probability: float = field(default=0.2, metadata={"help": "MNTP: share of each text's tokens masked."})
    mask_token: str = field(default="_", metadata={
        "help": "MNTP: mask token for a tokenizer that has none (llm2vec's 'blank' choice)."})
    # ---- stage 1: caption contrastive fine-tuning
    loss_scale: float = field(default=50.0, metadata={"help": "Cosine-similarity scale (1 / temperature)."})
    loss_centering: bool | None = field(default=None, metadata={
        "help": "Subtract the global batch's mean embedding before the cosines (the loss is then blind to a "
                "component every caption shares, so collapsing to one point does not lower it). Default: on for "
                "LLMs under 1B parameters (a raw SmolLM2 collapsed at scale 50 without it), off (official) above."})
    short_query_instruction: str | None = field(
        default=None,
        metadata={"help": "Instruction on a short-caption query (excluded from pooling; '' for none). Default: the "
                          f"official {OFFICIAL_SHORT_QUERY_INSTRUCTION!r}; none for LLMs under 1B parameters."},
    )
    long_query_instruction: str | None = field(
        default=None,
        metadata={"help": "Instruction on a long-caption query (excluded from pooling; '' for none). Default: the "
                          f"official {OFFICIAL_LONG_QUERY_INSTRUCTION!r}; none for LLMs under 1B parameters."},
    )
    instruction_separator: str = field(default="; ", metadata={"help": "Joins instruction and query text."})
    hard_negatives: bool = field(default=True, metadata={"help": "Add another row's caption as a hard negative."})
    source_mixing_weights: list[float] | None = field(
        default=None, metadata={"help": "Stage 1 on named sources (a dict train_dataset; CLI: --dataset, then each "
                                        "--pair-dataset): the share of steps of each source, in their order. Every "
                                        "batch comes from one source. Default: proportional to the sources' sizes."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (when no peft_config is given)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS), metadata={"help": "Modules that receive LoRA."}
    )
    # ---- stage 2: CLIP training against the frozen LLM
    image_column: str = field(default="image", metadata={"help": "Column of images (PIL images or paths)."})
    caption_columns: list[str] = field(
        default_factory=lambda: ["short_caption", "long_caption"],
        metadata={"help": "Caption columns; one is sampled per example (cached embeddings or raw text)."},
    )
    caption_sampling_weights: list[float] | None = field(
        default=None, metadata={"help": "Sampling weight per caption column (default: uniform, officially 50/50)."}
    )
    text_source: Literal["cached", "frozen", "lora"] = field(
        default="cached",
        metadata={"help": "cached: precomputed LLM embeddings; frozen / lora: run the embedded LLM each step "
                          "(frozen, or LoRA-tuned) for comparison."},
    )
    loss_type: Literal["clip", "siglip"] = field(
        default="clip",
        metadata={"help": "Stage-2 objective. clip: symmetric InfoNCE with the learnable logit_scale (official "
                          "LLM2CLIP). siglip: SigLIP's pairwise sigmoid loss with logit_scale and a learnable "
                          "logit_bias; the model needs a logit_bias (build it with logit_bias_init_value=-10.0 and "
                          "logit_scale_init_value=log(10), SigLIP's init)."},
    )
    allow_degenerate_teacher: bool = field(
        default=False, metadata={"help": "Train stage 2 even on cached embeddings that have no spread left after "
                                         "centering (the teacher check refuses them by default)."}
    )
    layer_decay: float = field(default=0.85, metadata={"help": "Layer-wise lr decay of the vision tower (1 = off)."})
    logit_scale_max: float | None = field(
        default=None, metadata={"help": "Upper bound logit_scale is clamped to after each step (stage 2). Default: "
                                        "ln 100 (the official clamp), or the model's starting logit_scale where that "
                                        "is larger (a pretrained SigLIP's ~ln 112 is kept with its logit_bias)."}
    )
    image_augmentation: bool = field(
        default=True, metadata={"help": "RandomResizedCrop(scale 0.9-1, bicubic) when training; else center crop."}
    )
    skip_bad_rows: bool = field(
        default=True, metadata={"help": "Skip training rows with an unreadable image or an empty / non-string caption "
                                        "(counted and logged); False stops at the first one, naming the row. "
                                        "Evaluation never skips rows."}
    )
    gradcache_chunk_size: int | None = field(
        default=None, metadata={"help": "GradCache: embed the batch in chunks of this many rows without graphs, "
                                        "take the loss on the whole batch, then backpropagate chunk by chunk. Exact "
                                        "full-batch gradients with the activation memory of one chunk."}
    )
    stream_shuffle_buffer_size: int = field(
        default=1000, metadata={"help": "Streamed training data (datasets.IterableDataset) with "
                                        "train_sampling_strategy='random': rows in the shuffle buffer (larger mixes "
                                        "better and holds more decoded rows in memory)."}
    )
    stop_on_collapse: bool = field(
        default=True, metadata={"help": "Stop when the training embeddings collapse to one point: the weights of the "
                                        "last step that did not look collapsed are saved as a model in "
                                        "OUTPUT_DIR/last-good-step-N and EmbeddingCollapseError names them (the CLI "
                                        "exits non-zero). False: a warning, and training goes on."}
    )
    collapse_spread_ratio: float = field(
        default=0.02, metadata={"help": "Collapse check: the embeddings of a batch count as collapsed when their "
                                        "spread (1 - |mean of the L2-normalised embeddings|^2) falls below this share "
                                        "of its value at the first optimizer step (and, for InfoNCE, the loss sits "
                                        "within 5%% of ln(candidates)); 0 turns the check off."}
    )
    collapse_patience: int = field(
        default=3, metadata={"help": "Collapse check: consecutive optimizer steps that must look collapsed."}
    )
    retrieval_metrics: bool = field(
        default=True, metadata={"help": "At each evaluation also compute caption retrieval accuracy (caption stage) "
                                        "or image<->text recall@1/5/10 (clip stage) on the eval dataset."}
    )
    # ---- overrides of TrainingArguments defaults (None = the stage's official value)
    learning_rate: float | None = field(default=None, metadata={
        "help": "Default: 2e-4 (caption; 2e-3 for LLMs under 1B parameters), 5e-5 (mntp; 1e-3 under 1B), 1e-5 (clip)."})
    warmup_steps: float | None = field(default=None, metadata={
        "help": "Default: 300 (caption) but at most a quarter of the run's steps, 0 (mntp, clip)."})
    weight_decay: float | None = field(default=None, metadata={"help": "Default: 0 (caption), 0.05 (clip)."})
    max_grad_norm: float | None = field(default=None, metadata={"help": "Default: 1.0 (caption), 5.0 (clip)."})
    lr_scheduler_type: str | None = field(default=None, metadata={"help": "Default: linear (caption), cosine (clip)."})
    eval_on_start: bool | None = field(default=None, metadata={
        "help": "Evaluate before training. Default: on in stage caption with an eval dataset and retrieval_metrics "
                "(the held-out CRA before training, for the log and the model card), else off."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the collators read raw columns."})
    dataloader_pin_memory: bool | None = field(default=None, metadata={
        "help": "Pin the DataLoaders' memory (faster copies to an accelerator). Default: on where an accelerator is "
                "present, off on a CPU-only machine (torch warns there at every loader asked to pin); use_cpu turns "
                "it off."})
    hub_strategy: str = field(
        default="end", metadata={"help": "Push only the final model (checkpoints hold LoRA adapters, not models)."}
    )

    def __post_init__(self) -> None:
        if self.stage not in STAGE_DEFAULTS:
            raise ValueError(f"stage must be 'mntp', 'caption' or 'clip', got {self.stage!r}.")
        # The stage defaults the user left unset (a model-size default or the warmup cap may replace them).
        self.defaulted_settings = sorted(name for name in STAGE_DEFAULTS[self.stage] if getattr(self, name) is None)
        if self.stage in TEXT_STAGES and self.activation_checkpointing is None and self.gradient_checkpointing is None:
            # The official stage 1 and llm2vec's MNTP train with it: an LLM's activations are the step's largest
            # memory (docs/results.md, "Benchmarks"); transformers' deprecated alias gradient_checkpointing counts
            # as set.
            self.activation_checkpointing = True
            self.defaulted_settings.append("activation_checkpointing")
        for name, value in STAGE_DEFAULTS[self.stage].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.dataloader_pin_memory is None:  # pinned memory only serves copies to an accelerator
            self.dataloader_pin_memory = torch.accelerator.is_available()
        if self.eval_on_start is None:  # the trainer turns it on for stage 1 with held-out pairs
            self.defaulted_settings.append("eval_on_start")
            self.eval_on_start = False
        if not 0 <= self.collapse_spread_ratio < 1 or self.collapse_patience < 1:
            raise ValueError(f"collapse_spread_ratio must be in [0, 1) and collapse_patience >= 1, got "
                             f"{self.collapse_spread_ratio} and {self.collapse_patience}.")
        if self.caption_sampling_weights is not None:
            if len(self.caption_sampling_weights) != len(self.caption_columns):
                raise ValueError(
                    f"caption_sampling_weights has {len(self.caption_sampling_weights)} entries for "
                    f"{len(self.caption_columns)} caption_columns {self.caption_columns}; give one weight per column."
                )
            if min(self.caption_sampling_weights) < 0 or sum(self.caption_sampling_weights) <= 0:
                raise ValueError("caption_sampling_weights must be non-negative and not all zero.")
        if self.loss_type not in ("clip", "siglip"):
            raise ValueError(f"loss_type must be 'clip' or 'siglip', got {self.loss_type!r}.")
        if self.loss_type != "clip" and self.stage != CLIP_STAGE:
            raise ValueError(f"loss_type={self.loss_type!r} is a stage-'clip' objective; stage {self.stage!r} "
                             "has its own loss.")
        if self.stage == MNTP_STAGE and self.gradcache_chunk_size:
            raise ValueError("gradcache_chunk_size applies to the contrastive stages; MNTP's loss is per token (use "
                             "gradient_accumulation_steps for a larger batch).")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}.")
        super().__post_init__()

    @property
    def sampling_seed(self) -> int:
        """Seed of the data's randomness (order, caption draws, query/positive coin flips, hard negatives):
        ``data_seed`` when set, else ``seed``, as transformers' samplers use them."""
        return self.seed if self.data_seed is None else self.data_seed

    def resolved(self, num_parameters: int | None = None, **settings: Any) -> tuple["LLM2CLIPTrainingArguments",
                                                                                      dict[str, Any]]:
        """A copy with the model-size defaults resolved; the arguments themselves are never changed, so they can be
        reused for another model. For a text stage on an LLM of ``num_parameters`` under 1B, the small-LLM settings
        (``SMALL_LLM_DEFAULTS``) replace the official ones that were left unset; ``settings`` are further defaults
        (names from ``defaulted_settings``) the caller resolved. Returns the copy and what changed. A DeepSpeed
        configuration is filled again from the copy, so its ``"auto"`` values take the resolved settings."""
        changed = {}
        if num_parameters is not None and num_parameters < SMALL_LLM_PARAMETERS:
            changed = {name: value for name, value in SMALL_LLM_DEFAULTS.get(self.stage, {}).items()
                       if name in self.defaulted_settings and getattr(self, name) != value}
        changed.update({name: value for name, value in settings.items()
                        if name in self.defaulted_settings and getattr(self, name) != value})
        resolved = copy.deepcopy(self)
        for name, value in changed.items():
            setattr(resolved, name, value)
        if changed and resolved.deepspeed:
            resolved.fill_deepspeed_config()
        return resolved, changed

    def resolved_for_run(self, num_parameters: int | None, evaluates: bool,
                         initial_logit_scale: float | None = None) -> "LLM2CLIPTrainingArguments":
        """:meth:`resolved` for a trainer: the small-LLM defaults (logged) for a text stage on an LLM of
        ``num_parameters``, ``eval_on_start`` for stage 1 with held-out data (``evaluates``: the CRA before
        training, for the log and the card's model-index) unless it was set, and for stage 2 a ``logit_scale_max``
        of at least the model's ``initial_logit_scale`` unless it was set."""
        defaults = {"eval_on_start": True} if self.stage == CAPTION_STAGE and evaluates else {}
        if self.stage == CLIP_STAGE and initial_logit_scale is not None:
            defaults.update(self._logit_scale_bound(initial_logit_scale))
        resolved, changed = self.resolved(num_parameters, **defaults)
        small = {name: value for name, value in changed.items() if name not in defaults}
        if small:
            logger.warning(
                f"stage={self.stage!r} on a {num_parameters / 1e6:.0f}M-parameter text model (under 1B): using the "
                f"small-LLM defaults {small} instead of the official values for 1B+ LLMs (measured on SmolLM2-135M, "
                "see docs/stage1.md; on the sentence encoder all-MiniLM-L6-v2 no single learning rate won on three "
                "caption-pair sets: docs/results.md); set them explicitly to override."
            )
        return resolved

    def _logit_scale_bound(self, initial: float) -> dict[str, float]:
        """The clamp bound for a model whose ``logit_scale`` starts at ``initial``: a default bound below it is
        raised to it (logged), so the first step does not change a pretrained model's temperature while its
        ``logit_bias`` stays; an explicit bound below it is kept, with a warning."""
        if initial <= self.logit_scale_max:
            return {}
        if "logit_scale_max" not in self.defaulted_settings:
            logger.warning(
                f"logit_scale_max={self.logit_scale_max:.4f} is below the model's logit_scale {initial:.4f}: the "
                f"first step lowers its temperature from {math.exp(initial):.2f} to "
                f"{math.exp(self.logit_scale_max):.2f} (a logit_bias is not adjusted). Leave logit_scale_max unset "
                "to keep the model's value as the bound."
            )
            return {}
        logger.info(f"logit_scale starts at {initial:.4f} (temperature {math.exp(initial):.2f}), above the official "
                    f"clamp ln 100: training clamps it to {initial:.4f} instead, so the model keeps its temperature.")
        return {"logit_scale_max": initial}

    def seed_random_generators(self) -> None:
        """Seed Python, NumPy and torch from ``seed`` as the Trainer does (``full_determinism`` also makes the
        kernels deterministic), so that what is built next (a new tower, adapter or LoRA weights) is reproducible."""
        from transformers.trainer_utils import enable_full_determinism, set_seed

        enable_full_determinism(self.seed) if self.full_determinism else set_seed(self.seed)

    def fill_deepspeed_config(self) -> None:
        """Build the DeepSpeed configuration from ``self.deepspeed`` again (transformers fills its ``"auto"`` values
        from these arguments once, when they are created), so resolved defaults reach DeepSpeed."""
        from accelerate.utils import DeepSpeedPlugin
        from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

        self.hf_deepspeed_config = HfTrainerDeepSpeedConfig(self.deepspeed)
        self.hf_deepspeed_config.trainer_config_process(self)
        self.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=self.hf_deepspeed_config)

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """The warmup of ``TrainingArguments``; a default (unset) warmup is capped at a quarter of the run."""
        steps = super().get_warmup_steps(num_training_steps)
        if "warmup_steps" in self.defaulted_settings:
            steps = min(steps, math.ceil(MAX_DEFAULT_WARMUP_SHARE * num_training_steps))
        return steps
