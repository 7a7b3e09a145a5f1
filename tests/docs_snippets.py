"""The code blocks of README.md and docs/**/*.md: found, classified, checked and run (``tests/test_docs.py``).

Every fenced block in ``python``, ``bash``, ``sh`` or ``shell`` is one of three kinds, chosen by an HTML comment on
the line above it (blank lines between are allowed):

* run (no marker): executed as written. A page's blocks run in order in one temporary folder holding the user's
  files (``docs_standins``), with ``HF_HOME`` a Hugging Face cache of tiny stand-ins for every Hub id the pages
  name and ``HF_HUB_OFFLINE=1``: Python blocks share one namespace, shell blocks run with ``bash -e -o pipefail``
  and see the shell variables earlier blocks of the page set (as in one terminal).
* ``<!-- docs-test: parse (why) -->``: for what needs GPUs, several processes, the network, or hours. Each command is
  checked without running it: ``llm2clip-hf`` / ``python -m llm2clip_hf.cli`` arguments parse with the CLI's own
  parser; ``accelerate launch`` arguments parse with accelerate's, the ``--config_file`` exists, and the launched
  command's arguments parse too; ``python script.py ...`` parses with the script's own argparse parser (stopped right
  after parsing); ``bash script.sh`` passes ``bash -n``; ``pip install`` names only extras that setup.py defines;
  ``pytest -m EXPR`` names only registered markers. A Python block is compiled.
* ``<!-- docs-test: skip (why) -->``: not run; ``tests/test_docs.py`` lists every skip and its reason.

Run as a script (``python tests/docs_snippets.py PAGE``, in the page's folder) it runs one page's blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LANGUAGES = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
MODES = ("run", "parse", "skip")
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)[^`]*$")
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<mode>\w+)\s*(?:\((?P<reason>.*)\))?\s*-->\s*$")
SHELL_SEPARATORS = {";", "&&", "||", "|", "&", ";;"}
SHELL_KEYWORDS = {"for", "do", "done", "if", "then", "else", "fi", "while", "in"}


@dataclass
class Block:
    page: str  # path relative to the repository root
    line: int  # 1-based line of the block's first code line
    language: str  # "python" or "bash"
    code: str
    mode: str = "run"
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def doc_pages() -> list[Path]:
    """README.md and every Markdown page of the documentation site."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def page_blocks(path: Path) -> list[Block]:
    """The page's fenced blocks in a language this module runs, with their marker; a malformed or unknown marker, or a
    marker above no such block, is an error naming the line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    page = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
    blocks: list[Block] = []
    markers: dict[int, tuple[str, str]] = {}
    for number, text in enumerate(lines, 1):
        if text.lstrip().startswith("<!--") and "docs-test" in text:
            match = MARKER.match(text)
            if not match or match["mode"] not in ("parse", "skip") or not (match["reason"] or "").strip():
                raise ValueError(f"{page}:{number}: a docs-test marker is <!-- docs-test: parse (why) --> or "
                                 f"<!-- docs-test: skip (why) -->, with a reason: {text.strip()!r}")
            markers[number] = (match["mode"], match["reason"].strip())
    used: set[int] = set()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, fence, info = opening["indent"], opening["fence"], opening["info"].lower()
        body: list[str] = []
        end = index + 1
        while end < len(lines):
            closing = lines[end].strip()
            if closing.startswith(fence[0] * len(fence)) and not closing.strip(fence[0]):
                break
            body.append(lines[end][len(indent):] if lines[end].startswith(indent) else lines[end].lstrip())
            end += 1
        if info in LANGUAGES:
            block = Block(page, index + 2, LANGUAGES[info], "\n".join(body) + "\n")
            above = index - 1
            while above >= 0 and not lines[above].strip():
                above -= 1
            if above + 1 in markers:
                block.mode, block.reason = markers[above + 1]
                used.add(above + 1)
            blocks.append(block)
        index = end + 1
    stray = sorted(set(markers) - used)
    if stray:
        raise ValueError(f"{page}:{stray[0]}: a docs-test marker must stand right above a python or bash block.")
    return blocks


# ------------------------------------------------------------------------------------------------------------- shell
def shell_commands(code: str, *, strict: bool) -> list[list[str]]:
    """The simple commands of a shell block, as argument lists (continuation lines joined, comments and leading
    ``VAR=value`` assignments dropped). ``strict``: a command with a ``$`` expansion, a loop or a condition is an
    error (a parse-mode block must be plain commands); otherwise such commands are left out."""
    text = re.sub(r"\\\n", " ", code)
    commands: list[list[str]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        tokens = list(lexer)
        current: list[str] = []
        for token in [*tokens, ";"]:
            if token not in SHELL_SEPARATORS:
                current.append(token)
                continue
            while current and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", current[0]):
                current.pop(0)
            if current:
                dynamic = current[0] in SHELL_KEYWORDS or "$" in line or "`" in line
                if dynamic and strict:
                    raise ValueError(f"a parse-checked block holds plain commands only, not {line.strip()!r}")
                if not dynamic:
                    commands.append(current)
            current = []
    return commands


class Parsed(Exception):
    """Raised right after a script's argparse parser accepted its arguments."""


def check_script(script: str, args: list[str]) -> None:
    """``python SCRIPT ARGS`` parses with the script's own parser: the script is run up to its ``parse_args`` (its
    imports and definitions execute), then stopped."""
    import argparse as argparse_module

    path = REPO / script
    if not path.is_file():
        raise ValueError(f"{script} does not exist")
    original = argparse_module.ArgumentParser.parse_known_args

    def parse_then_stop(self, *a, **k):
        result = original(self, *a, **k)
        raise Parsed()

    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv, sys.path = [str(path), *args], [str(path.parent), *sys.path]
    argparse_module.ArgumentParser.parse_known_args = parse_then_stop
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            runpy.run_path(str(path), run_name="__main__")
    except Parsed:
        return
    except SystemExit as stop:
        raise ValueError(f"{script} {shlex.join(args)}: its parser refused the arguments: "
                         f"{stderr.getvalue().strip()[-500:]} (exit {stop.code})") from None
    finally:
        argparse_module.ArgumentParser.parse_known_args = original
        sys.argv, sys.path = saved_argv, saved_path
    raise ValueError(f"{script} finished without parsing arguments with argparse: it cannot be parse-checked")


def check_cli(args: list[str]) -> None:
    """``llm2clip-hf ARGS`` parses with the command's own parser (nothing runs)."""
    from llm2clip_hf.cli.commands import COMMANDS, parse_command_arguments

    if not args or args[0] in ("-h", "--help"):
        return
    if args[0] not in COMMANDS:
        raise ValueError(f"llm2clip-hf has no command {args[0]!r}")
    if "-h" in args or "--help" in args:
        return
    import transformers.training_args

    args = [a for a in args if a != "--debug"]
    stderr = io.StringIO()
    cwd = os.getcwd()
    gpu_check = transformers.training_args.is_torch_bf16_gpu_available
    try:
        os.chdir(REPO)  # a --config FILE is read relative to the repository, where the page runs it
        # parsed as on the GPU machine the block is written for: TrainingArguments refuses --bf16 true on a CPU
        transformers.training_args.is_torch_bf16_gpu_available = lambda *a, **k: True
        with contextlib.redirect_stderr(stderr):
            parse_command_arguments(COMMANDS[args[0]], args[1:], prog=f"llm2clip-hf {args[0]}")
    except SystemExit:
        raise ValueError(f"llm2clip-hf {shlex.join(args)}: {stderr.getvalue().strip()[-600:]}") from None
    finally:
        transformers.training_args.is_torch_bf16_gpu_available = gpu_check
        os.chdir(cwd)


def check_accelerate(args: list[str]) -> None:
    """``accelerate launch ARGS``: the launcher's arguments parse, its config file exists, and the launched command's
    arguments parse."""
    from accelerate.commands.launch import launch_command_parser

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            launch = launch_command_parser().parse_args(args)
    except SystemExit:
        raise ValueError(f"accelerate launch {shlex.join(args)}: {stderr.getvalue().strip()[-500:]}") from None
    if launch.config_file and not (REPO / launch.config_file).is_file():
        raise ValueError(f"accelerate launch: --config_file {launch.config_file} does not exist")
    if launch.module and launch.training_script == "llm2clip_hf.cli":
        check_cli(launch.training_script_args)
    elif launch.module:
        raise ValueError(f"accelerate launch -m {launch.training_script}: no parser known for this module")
    else:
        check_script(launch.training_script, launch.training_script_args)


def registered_markers() -> set[str]:
    import tomllib

    settings = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    return {marker.split(":")[0].strip() for marker in settings.get("markers", [])}


def setup_extras() -> set[str]:
    text = (REPO / "setup.py").read_text()
    section = text[text.index("extras_require"):]
    return set(re.findall(r'^\s*"([\w-]+)":', section, re.M))


def check_command(command: list[str]) -> None:
    """One command of a parse-mode block (or a command of a run-mode block, checked before anything runs)."""
    program, args = command[0], command[1:]
    if program == "llm2clip-hf":
        return check_cli(args)
    if program == "accelerate":
        if args[:1] != ["launch"]:
            raise ValueError(f"no parser known for accelerate {args[:1]}")
        return check_accelerate(args[1:])
    if program in ("python", "python3"):
        if args[:2] == ["-m", "llm2clip_hf.cli"]:
            return check_cli(args[2:])
        if args[:2] == ["-m", "pytest"]:
            for flag, value in zip(args[2:], args[3:]):
                if flag == "-m":
                    unknown = set(re.findall(r"[A-Za-z_]\w*", value)) - {"not", "and", "or"} - registered_markers()
                    if unknown:
                        raise ValueError(f"pytest -m {value!r}: markers {sorted(unknown)} are not registered")
            return None
        if args[:2] == ["-m", "pip"]:
            return check_command(["pip", *args[2:]])
        if args and not args[0].startswith("-"):
            return check_script(args[0], args[1:])
    if program == "pip" and args[:1] == ["install"]:
        for spec in args[1:]:
            extras = re.match(r"^[^\[]*\[([^\]]*)\]", spec)
            if extras and spec.lstrip().startswith("."):
                unknown = {e.strip() for e in extras.group(1).split(",")} - setup_extras()
                if unknown:
                    raise ValueError(f"pip install {spec}: setup.py defines no extra {sorted(unknown)}")
        return None
    if program == "bash" and args and args[0].endswith(".sh"):
        script = REPO / args[0]
        if not script.is_file():
            raise ValueError(f"bash {args[0]}: no such script")
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        if result.returncode:
            raise ValueError(f"bash -n {args[0]}: {result.stderr.strip()}")
        return None
    raise ValueError(f"no parser known for {shlex.join(command)!r}: run the block, or mark it "
                     "<!-- docs-test: skip (why) -->")


def check_block(block: Block) -> list[str]:
    """Parse-check a block without running anything: Python compiles; every command that can be read statically
    parses (see ``check_command``). Returns the commands checked."""
    if block.mode == "skip":
        return []
    if block.language == "python":
        compile(block.code, block.where, "exec")
        return []
    checked = []
    for command in shell_commands(block.code, strict=block.mode == "parse"):
        if block.mode == "run":
            if command[0] == "pip" or command[1:3] == ["-m", "pip"] or command[-1:] == ["scripts/install.sh"] or \
                    "pytest" in command:
                raise ValueError(f"{block.where}: a block that installs packages or runs the tests cannot run inside "
                                 "them; mark it <!-- docs-test: parse (why) -->")
            if command[0] not in ("llm2clip-hf", "accelerate") and command[1:3] != ["-m", "llm2clip_hf.cli"]:
                continue  # other programs of a run block (ls, python -c, ...) are simply run
        try:
            check_command(command)
        except ValueError as error:
            raise ValueError(f"{block.where}: {error}") from None
        checked.append(shlex.join(command))
    return checked


# --------------------------------------------------------------------------------------------------------------- run
SHELL_STATE = ".docs-shell-variables"  # in the page's folder: the shell variables its blocks set, for the next ones


def shell_with_state(code: str) -> str:
    """``code`` preceded by the variables earlier shell blocks of the page set, and followed by saving the ones it
    sets: a page's shell blocks continue each other as in one terminal."""
    return (f'[ -f {SHELL_STATE} ] && source {SHELL_STATE}\n'
            '__docs_before=" $(compgen -v | tr "\\n" " ") "\n'
            f'{code}\n'
            'for __docs_name in $(compgen -v); do\n'
            '  case "$__docs_before" in *" $__docs_name "*) continue;; esac\n'
            '  case "$__docs_name" in __docs_*|BASH*|FUNCNAME|PIPESTATUS|_) continue;; esac\n'
            f'  declare -p "$__docs_name" >> {SHELL_STATE}\n'
            'done\n')


def run_page(page: Path, *, only_check: bool = False) -> None:
    """Run one page's blocks in order in the current folder (see the module docstring)."""
    namespace: dict = {"__name__": "__main__"}
    for block in page_blocks(page):
        if block.mode == "skip":
            continue
        if block.mode == "parse":
            check_block(block)
            print(f"[docs] {block.where} parse-checked", flush=True)
            continue
        check_block(block)
        if only_check:
            continue
        print(f"[docs] {block.where} running ({block.language})", flush=True)
        if block.language == "python":
            source = "\n" * (block.line - 1) + block.code  # tracebacks name the page's own line numbers
            exec(compile(source, str(page), "exec"), namespace)
        else:
            result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", shell_with_state(block.code)])
            if result.returncode:
                raise SystemExit(f"[docs] {block.where}: the shell block exited with {result.returncode}")
    print(f"[docs] {page}: every block passed", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run one documentation page's code blocks in the current folder.")
    parser.add_argument("page", type=Path)
    run_page(parser.parse_args().page.resolve())


if __name__ == "__main__":
    main()
