"""The ``llm2clip-hf`` command line. Each command's arguments are dataclasses parsed by ``HfArgumentParser``;
``--config FILE`` (YAML or JSON) supplies defaults that flags override."""

from __future__ import annotations

import json
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
    arguments: tuple[type, ...]
    run: Callable[..., Any]
    positionals: tuple[str, ...] = ()


@dataclass
class ConvertArguments:
    checkpoint: str = field(metadata={"help": "Official eva_clip LLM2CLIP .pt checkpoint (vision tower + adapter)."})
    output_dir: str = field(metadata={"help": "Directory to write the transformers checkpoint to."})
    vision_num_heads: int | None = field(default=None, metadata={"help": "Attention heads (default: width // 64)."})
    image_size: int | None = field(
        default=None, metadata={"help": "Target image size; the position embedding is resized bicubically."}
    )


def run_convert(args: ConvertArguments) -> dict[str, Any]:
    from .convert import convert_eva_clip_checkpoint

    overrides = {"image_size": args.image_size} if args.image_size is not None else {}
    model = convert_eva_clip_checkpoint(args.checkpoint, vision_num_heads=args.vision_num_heads, **overrides)
    model.save_pretrained(args.output_dir)
    vision = model.config.vision_config
    return {
        "output_dir": str(args.output_dir),
        "vision": f"EVA02 width {vision.hidden_size}, depth {vision.num_hidden_layers}, heads "
                  f"{vision.num_attention_heads}, image {vision.image_size}, patch {vision.patch_size}",
        "text_embedding_dim": model.config.text_embedding_dim,
        "projection_dim": model.config.projection_dim,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


COMMANDS: dict[str, Command] = {
    "convert": Command("Convert an official eva_clip checkpoint to a transformers checkpoint with remote code.",
                       (ConvertArguments,), run_convert, positionals=("checkpoint", "output_dir")),
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
    parser = HfArgumentParser(
        command.arguments, prog=prog,
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llm2clip-hf`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:10s} {command.help}" for name, command in COMMANDS.items()]
        print("usage: llm2clip-hf COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines))
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    command = COMMANDS[argv[0]]
    try:
        result = command.run(*parse_command_arguments(command, argv[1:], prog=f"llm2clip-hf {argv[0]}"))
    except (ValueError, TypeError, FileNotFoundError) as error:
        # Problems with the user's inputs: the message says what is wrong and how to fix it.
        print(f"llm2clip-hf {argv[0]}: error: {error}", file=sys.stderr)
        return 1
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
