"""The ``llm2clip-hf`` command line (``python -m llm2clip_hf.cli`` under ``accelerate launch``): the commands and
the glue from their arguments to the package (:mod:`.training_run` for ``train``)."""

from .commands import COMMANDS, main

__all__ = ["COMMANDS", "main"]
