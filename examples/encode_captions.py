"""Embed captions with a real LLM (SmolLM2-135M-Instruct, offline) as an LLM2Vec-style text encoder.

Run: python examples/encode_captions.py
"""

import torch
import torch.nn.functional as F

from llm2clip_hf import LLM2CLIPTextModel
from llm2clip_hf.conversion.assets import smollm2_gguf

directory, gguf_file = smollm2_gguf()
model = LLM2CLIPTextModel.from_llm(directory, gguf_file=gguf_file, pooling_mode="mean")

short = ["a red apple on a table", "a dog catching a frisbee", "a snowy mountain at sunrise"]
long = [
    "A single glossy red apple rests on a worn wooden kitchen table, lit by soft window light.",
    "A brown dog leaps high above a grassy park to catch a yellow frisbee in its mouth.",
    "Snow-covered mountain peaks glow pink and orange as the sun rises over a quiet valley.",
]
queries = model.encode(short, instruction="Given a sentence, retrieve a detailed relevant sentence")
documents = model.encode(long)
similarity = F.normalize(queries, dim=-1) @ F.normalize(documents, dim=-1).T
torch.set_printoptions(precision=3)
print("cosine similarity, short captions (rows) vs detailed captions (columns):")
print(similarity)
print("caption retrieval accuracy:", (similarity.argmax(dim=1) == torch.arange(len(short))).float().mean().item())
