"""mkdocs hook: the CLI reference page is written at build time from the commands' own parsers.

``docs/reference/cli.md`` holds the marker ``<!-- cli-reference -->``; this hook replaces it with ``llm2clip-hf
--help`` and each command's ``--help``, built by :func:`llm2clip_hf.cli.commands.build_parser` (the parser the CLI
parses with), so the page cannot drift from the argument definitions. Wrapped at 100 columns.
"""

from __future__ import annotations

import os

MARKER = "<!-- cli-reference -->"
WIDTH = "100"


def cli_reference_markdown() -> str:
    """The generated Markdown: the top-level usage, then one section per command with its full ``--help``."""
    from llm2clip_hf.cli.commands import COMMANDS, build_parser, usage_text

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH  # argparse wraps at the terminal width
    try:
        parts = ["## llm2clip-hf", "", "```text", usage_text(), "```", ""]
        for name, command in COMMANDS.items():
            parser = build_parser(command, prog=f"llm2clip-hf {name}")
            parts += [f"## llm2clip-hf {name}", "", command.help, "", "```text", parser.format_help().rstrip(), "```",
                      ""]
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Replace the marker of the CLI reference page with the generated reference."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_reference_markdown())
