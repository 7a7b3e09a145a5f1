"""The ``llm2clip-hf`` command line. Each command's arguments are dataclasses parsed by ``HfArgumentParser``;
``--config FILE`` (YAML or JSON) supplies defaults that flags override."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from .arguments import (
    AssembleArguments,
    ClipModelArguments,
    ColumnArguments,
    ConvertArguments,
    DatasetArguments,
    EmbedArguments,
    EvaluateArguments,
    ExportVisionArguments,
    PrecisionArguments,
    TextModelArguments,
    TrainDataArguments,
    process_device,
    process_state,
)


@dataclass
class Command:
    """One subcommand: its argument dataclasses, leading positional fields, and the function that runs it."""

    help: str
    arguments: tuple[type | Callable[[], type], ...]  # dataclasses, or functions importing them on use
    run: Callable[..., Any]
    positionals: tuple[str, ...] = ()


def run_convert(args: ConvertArguments) -> dict[str, Any]:
    from ..conversion import convert_checkpoint_with_report

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

    from ..data import build_embedding_cache, read_cache_metadata

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
    result = {"output_dir": args.output_dir, "rows": len(cached), "processes": state.num_processes,
              "device": str(text_model.device), "cpu_threads": torch.get_num_threads(),
              **(read_cache_metadata(cached) or {})}
    # The cache is complete and stays: a degenerate teacher is named before stage 2 spends time on it.
    result["teacher"] = cache_teacher_check(cached, columns.caption_columns, args.allow_degenerate_teacher)
    return result


def cache_teacher_check(cached: Any, caption_columns: Sequence[str], allow_degenerate: bool) -> dict[str, Any]:
    """Teacher statistics of a cache (a sample of rows); a degenerate teacher is refused unless allowed, a dominated
    one is warned about, and a check skipped for too few captions says so. The cache itself is never touched."""
    from transformers.utils import logging as hf_logging

    from ..evaluation.teacher_quality import DOMINATED, SKIPPED, check_cached_teacher

    statistics = check_cached_teacher(cached, caption_columns, allow_degenerate,
                                      "--allow-degenerate-teacher true (the cache is kept)")
    logger = hf_logging.get_logger(__name__)
    if statistics.verdict == DOMINATED:
        logger.warning(
            f"The teacher's caption embeddings are dominated by one common component ({statistics.describe()}): "
            "`train --stage clip` will center a new adapter's input (--adapter-input-normalization auto).")
    elif statistics.verdict == SKIPPED:
        logger.warning(f"Teacher check {statistics.describe()}; the cache is written all the same.")
    return statistics.as_dict()


def run_evaluate(text: TextModelArguments, data: DatasetArguments, columns: ColumnArguments,
                 args: EvaluateArguments, precision: PrecisionArguments) -> dict[str, Any] | None:
    from .. import evaluation
    from ..conversion.model_loading import load_clip_model

    tasks = ("retrieval", "zeroshot", "caption-retrieval", "teacher", "mteb")
    if args.task not in tasks:
        raise ValueError(f"Unknown --task {args.task!r}; choose one of {list(tasks)}.")
    if not process_state().is_main_process:
        return None  # metrics are computed once, on the main process
    device = process_device()
    if args.task == "caption-retrieval":
        metrics = evaluation.evaluate_caption_retrieval(
            text.load(precision).to(device), data.load(), columns.caption_columns, args.query_instruction, args.batch_size)
    elif args.task == "teacher":
        metrics = evaluation.evaluate_teacher(text.load(precision).to(device), data.load(), columns.caption_columns,
                                              args.max_rows, args.batch_size)
    elif args.task == "mteb" and args.model is None:  # a text encoder alone, for MTEB's text tasks
        if text.text_model is None:
            raise ValueError("--task mteb needs --model (an LLM2CLIP model) or --text-model (a text encoder alone).")
        metrics = evaluation.run_mteb_from_cli(text.load(precision).to(device), None, data, columns, args)
    else:
        if args.model is None:
            raise ValueError(f"--task {args.task} needs --model (a saved LLM2CLIPModel).")
        model = load_clip_model(args.model, **precision.from_pretrained_kwargs()).to(device)
        text_model = text.load(precision).to(device) if text.text_model is not None or model.text_model is None \
            else None
        dataset = data.load(columns.image_column) if args.task != "mteb" else None
        if args.task == "mteb":
            metrics = evaluation.run_mteb_from_cli(model, text_model, data, columns, args)
        elif args.task == "retrieval":
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
    from ..conversion.pretrained_vision import assemble

    if text.text_model is None:
        raise ValueError("assemble needs --text-model: the LLM (or saved LLM2CLIP text encoder) whose embeddings the "
                         "adapter of --model was trained on.")
    return assemble(args.model, text.load(), args.output_dir)


def run_export_vision(args: ExportVisionArguments) -> dict[str, Any]:
    from ..conversion.vision_export import export_vision_tower

    return export_vision_tower(args.model, args.output_dir)


def run_demo(args: Any) -> dict[str, Any] | None:
    from ..demo import run

    return run(args)


def _demo_arguments() -> type:
    from ..demo import DemoArguments

    return DemoArguments


def _training_arguments() -> type:
    from ..trainers import LLM2CLIPTrainingArguments

    return LLM2CLIPTrainingArguments


COMMANDS: dict[str, Command] = {
    "train": Command("Train MNTP (--stage mntp), stage 1 (--stage caption) or stage 2 (--stage clip) with "
                     "LLM2CLIPTrainer.",
                     (TextModelArguments, TrainDataArguments, ClipModelArguments, _training_arguments,
                      PrecisionArguments), run_train),
    "embed": Command("Precompute LLM caption embeddings as dataset columns (the stage-2 cache).",
                     (TextModelArguments, DatasetArguments, ColumnArguments, EmbedArguments, PrecisionArguments),
                     run_embed),
    "evaluate": Command("Retrieval R@1/5/10, zero-shot accuracy, caption retrieval accuracy (CRA), the teacher "
                        "check (is a text model's embedding usable for stage 2), or MTEB (MIEB) tasks.",
                        (TextModelArguments, DatasetArguments, ColumnArguments, EvaluateArguments,
                         PrecisionArguments), run_evaluate),
    "convert": Command("Convert an official LLM2CLIP checkpoint (eva_clip .pt with an EVA02, OpenAI-CLIP or SigLIP2 "
                       "tower, a published Hugging Face repo, or an EVA-CLIP / open_clip .pt) to a transformers "
                       "checkpoint with remote code.",
                       (ConvertArguments,), run_convert, positionals=("checkpoint", "output_dir")),
    "assemble": Command("One model from two published parts: an LLM2CLIP image side + adapter and its text model.",
                        (TextModelArguments, AssembleArguments), run_assemble),
    "export-vision": Command("The vision tower of an LLM2CLIP model, with its image processor, as a standalone model "
                             "for a multimodal LLM (transformers' Llava).", (ExportVisionArguments,), run_export_vision),
    "demo": Command("End-to-end demo: SmolLM2 + emoji images, stage 1, cache, stage 2, evaluation, reload.",
                    (_demo_arguments,), run_demo),
}


def build_parser(command: Command, prog: str) -> HfArgumentParser:
    """The parser of one command, as ``parse_command_arguments`` uses it and ``--help`` prints it (the documentation's
    CLI reference is generated from it). Its usage line shows the positional form when the command has one."""
    classes = [a if isinstance(a, type) and hasattr(a, "__dataclass_fields__") else a() for a in command.arguments]
    description = (f"{command.help} Arguments may also come from --config FILE (YAML or JSON); flags override it. "
                   f"{DEBUG_FLAG} shows the traceback of every error.")
    usage = None
    if command.positionals:
        words = " ".join(name.upper() for name in command.positionals)
        flags = " ".join(f"--{name} {name.upper()}" for name in command.positionals)
        usage = f"{prog} {words} [options]\n       {prog} {flags} [options]"
        description += f" The positional form `{prog} {words}` is the same as `{prog} {flags}`."
    return HfArgumentParser(classes, prog=prog, usage=usage, description=description)


def parse_command_arguments(command: Command, argv: Sequence[str], prog: str) -> tuple[Any, ...]:
    """Parse ``argv`` into the command's dataclasses; leading bare words fill its positional fields in order."""
    argv = list(argv)
    named: list[str] = []
    for name in command.positionals:
        if argv and not argv[0].startswith("-"):
            named += [f"--{name}", argv.pop(0)]
    config_path = _pop_option(argv, "--config")
    from_file = _as_flags(_read_config_file(config_path)) if config_path is not None else []
    parser = build_parser(command, prog)
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


def reported_errors() -> tuple[type[BaseException], ...]:
    """Errors printed as one line (exit 1): bad inputs, and a training run stopped on collapsed embeddings (its
    message names the kept weights and what to change)."""
    from ..trainers.training_health import EmbeddingCollapseError

    return (*USER_ERRORS, EmbeddingCollapseError)
DEBUG_FLAG = "--debug"


def usage_text() -> str:
    """What ``llm2clip-hf --help`` prints: the commands and the options every command takes."""
    lines = [f"  {name:13s} {command.help}" for name, command in COMMANDS.items()]
    return ("usage: llm2clip-hf COMMAND [ARGS] [--debug]\n\ncommands:\n" + "\n".join(lines) + "\n\noptions:\n"
            f"  {DEBUG_FLAG:13s} Show the traceback of every error (without it, errors in the inputs print one "
            "line).\n  --config FILE Read the command's arguments from a YAML or JSON file; flags override it.\n\n"
            "llm2clip-hf COMMAND --help describes each command's arguments.")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llm2clip-hf`` console script. ``--debug``, anywhere in ``argv``, shows the traceback of
    user errors too."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [token for token in argv if token != DEBUG_FLAG]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(usage_text())
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    command = COMMANDS[argv[0]]
    try:
        result = command.run(*parse_command_arguments(command, argv[1:], prog=f"llm2clip-hf {argv[0]}"))
    except Exception as error:
        if debug or not isinstance(error, reported_errors()):
            raise
        print(f"llm2clip-hf {argv[0]}: error: {error} (run with {DEBUG_FLAG} for the traceback)", file=sys.stderr)
        return 1
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    release_process_group()
    return 0


def release_process_group() -> None:
    """Shut down the process group a launcher started (``accelerate launch``) once a command has succeeded, with
    every process at the same point: a barrier first (a process whose work ended early, such as a rank other than 0
    while rank 0 writes the final model, waits for the others), then the objects still holding the group (a finished
    Trainer, DeepSpeed's engine: reference cycles) are collected, then the group is destroyed. Left to the
    interpreter's exit, gloo's worker threads were torn down during finalization and aborted a process whose work
    had succeeded (SIGABRT, "terminate called without an active exception": 3 runs in 12 of the ZeRO-3 CLI test;
    0 in 28 with this shutdown).
    After an error the group is left as it is, since another process may still be waiting in a collective."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()
        gc.collect()

