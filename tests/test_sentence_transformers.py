"""A saved LLM2CLIPTextModel (stage-1 output included) in sentence-transformers v6: loaded with
``SentenceTransformer(dir, trust_remote_code=True)`` where the package is not importable, its ``encode`` against
ours with and without an instruction, and one of sentence-transformers' evaluators running on it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset

from llm2clip_hf import LLM2CLIPTextModel
from llm2clip_hf.testing import tiny_caption_pair_rows
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments

pytest.importorskip("sentence_transformers")

INSTRUCTION = "Given a sentence, retrieve a detailed relevant sentence"
TEXTS = ["a red bicycle leaning on a brick wall", "two dogs", "a bowl of ramen with an egg and spring onions"]

ENCODE = textwrap.dedent("""
    import json, sys
    sys.modules["llm2clip_hf"] = None  # the folder's own code only: importing the package must fail here
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(sys.argv[1], trust_remote_code=True, device="cpu")
    texts, instruction = json.loads(sys.argv[2]), sys.argv[3]
    plain = model.encode(texts, convert_to_tensor=True)
    prompted = model.encode(texts, prompt=instruction, convert_to_tensor=True)
    print(json.dumps({"plain": plain.tolist(), "prompted": prompted.tolist(),
                      "dimension": model.get_sentence_embedding_dimension()}))
""")


@pytest.fixture(scope="module")
def stage1_dir(tiny_llm_dir, tmp_path_factory):
    """A stage-1 output: LoRA trained for 3 steps, merged and saved by the trainer."""
    out = tmp_path_factory.mktemp("stage1")
    torch.manual_seed(0)
    args = LLM2CLIPTrainingArguments(output_dir=str(out), stage="caption", per_device_train_batch_size=8, max_steps=3,
                                     learning_rate=1e-2, warmup_steps=0, save_strategy="no", use_cpu=True,
                                     report_to="none", disable_tqdm=True)
    trainer = LLM2CLIPTrainer(model=LLM2CLIPTextModel.from_llm(tiny_llm_dir), args=args,
                              train_dataset=Dataset.from_list(tiny_caption_pair_rows()))
    trainer.train()
    trainer.save_model()
    return out


@pytest.mark.slow
def test_sentence_transformers_encode_equals_ours_with_and_without_an_instruction(stage1_dir):
    assert (stage1_dir / "modules.json").is_file() and (stage1_dir / "sentence_transformers_llm2clip.py").is_file()
    result = subprocess.run([sys.executable, "-c", ENCODE, str(stage1_dir), json.dumps(TEXTS), INSTRUCTION],
                            capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                              "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    st = json.loads(result.stdout.strip().splitlines()[-1])
    ours = LLM2CLIPTextModel.from_pretrained(stage1_dir)
    plain, prompted = ours.encode(TEXTS), ours.encode(TEXTS, instruction=INSTRUCTION)
    assert st["dimension"] == ours.config.hidden_size
    torch.testing.assert_close(torch.tensor(st["plain"]), plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(st["prompted"]), prompted, rtol=1e-4, atol=1e-5)
    # the instruction is attended to (the embeddings move) but not pooled: pooling it would be another vector
    assert (prompted - plain).abs().max() > 1e-3
    pooled_with_prompt = ours.encode([f"{INSTRUCTION} {text}" for text in TEXTS])
    assert (prompted - pooled_with_prompt).abs().max() > 1e-3


def test_a_sentence_transformers_evaluator_runs_on_the_encoder(stage1_dir):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    model = SentenceTransformer(str(stage1_dir), trust_remote_code=True, device="cpu")
    rows = tiny_caption_pair_rows()[:16]
    queries = {str(i): row["short_caption"] for i, row in enumerate(rows)}
    corpus = {str(i): row["long_caption"] for i, row in enumerate(rows)}
    evaluator = InformationRetrievalEvaluator(queries, corpus, {q: {q} for q in queries}, name="captions",
                                              accuracy_at_k=[1], precision_recall_at_k=[1], show_progress_bar=False)
    metrics = evaluator(model)
    # accuracy@1 of the evaluator equals CRA short -> long from our embeddings
    ours = LLM2CLIPTextModel.from_pretrained(stage1_dir)
    short, long = ours.encode(list(queries.values())), ours.encode(list(corpus.values()))
    scores = torch.nn.functional.normalize(short, dim=-1) @ torch.nn.functional.normalize(long, dim=-1).T
    expected = (scores.argmax(dim=1) == torch.arange(len(rows))).float().mean().item()
    assert metrics["captions_cosine_accuracy@1"] == pytest.approx(expected)
