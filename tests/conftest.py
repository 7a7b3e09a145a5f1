import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from llm2clip_hf import LLM2CLIPTextModel  # noqa: E402
from llm2clip_hf.testing import make_tiny_llm  # noqa: E402

CAPTIONS = [
    "a photo of a cat sitting on a red sofa near the window",
    "a dog",
    "two people walk along a sandy beach at sunset while waves roll in, and a detailed close-up of a flower",
    "a bowl of fresh fruit",
    "the quick brown fox jumps over the lazy dog",
]


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory):
    """A random tiny Llama checkpoint whose tokenizer adds BOS, saved like a Hub repo."""
    return make_tiny_llm(tmp_path_factory.mktemp("tiny_llm"))


@pytest.fixture(scope="session")
def tiny_llm_nobos_dir(tmp_path_factory):
    """Same, with a tokenizer that adds no special tokens (like SmolLM2's)."""
    return make_tiny_llm(tmp_path_factory.mktemp("tiny_llm_nobos"), add_bos=False, seed=1)


@pytest.fixture()
def text_model(tiny_llm_dir):
    torch.manual_seed(0)
    return LLM2CLIPTextModel.from_llm(tiny_llm_dir)


@pytest.fixture()
def captions():
    return list(CAPTIONS)
