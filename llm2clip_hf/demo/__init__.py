"""``llm2clip-hf demo``: the whole LLM2CLIP recipe offline on real assets (SmolLM2-135M and the emoji images
shipped in ``emoji/``), the raw and the stage-1 LLM compared as teachers of stage 2 (:mod:`.recipe`), with its
report (:mod:`.report`) and dataset (:mod:`.emoji_dataset`)."""

from .emoji_dataset import EMOJI_SPLITS, emoji_dataset_dir, load_emoji_dataset
from .recipe import DemoArguments, emoji_splits, run

__all__ = ["DemoArguments", "EMOJI_SPLITS", "emoji_dataset_dir", "emoji_splits", "load_emoji_dataset", "run"]
