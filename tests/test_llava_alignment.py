"""The demo's LLaVA feature alignment (demo/llava_alignment.py): only the projector trains, the metrics on a model
that knows nothing (uniform next-token distribution: perplexity = vocabulary size, choice accuracy 0, ties never
counted as hits), and the demo's --llava-alignment run end to end in smoke mode."""

from __future__ import annotations

import pytest
import torch

from llm2clip_hf.demo import emoji_splits
from llm2clip_hf.demo.llava_alignment import LlavaAlignment, load_causal_lm, untrained_tower_state
from llm2clip_hf.demo.recipe import DemoArguments, run, tiny_eva02


@pytest.fixture(scope="module")
def alignment(tmp_path_factory):
    return LlavaAlignment(tiny_eva02(True), *load_causal_lm(None, True, tmp_path_factory.mktemp("llm")))


def test_alignment_trains_the_projector_only(alignment, tmp_path):
    train, _ = emoji_splits(True)
    llava = alignment.model
    tower = untrained_tower_state(tiny_eva02(True), 0)
    llm_before = {k: v.clone() for k, v in llava.state_dict().items() if "language_model" in k or "lm_head" in k}
    losses = alignment.align(tower, 0, train, steps=3, batch_size=8, learning_rate=1e-2, output_dir=tmp_path)
    projector_first = {k: v.clone() for k, v in llava.model.multi_modal_projector.state_dict().items()}
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = llava.state_dict()
    assert llm_before and all(torch.equal(after[k], v) for k, v in llm_before.items())  # the LLM untouched
    assert all(torch.equal(v, tower[k]) for k, v in llava.model.vision_tower.state_dict().items())  # the tower too
    # the same seed re-initialises the projector identically: a second run ends where the first did
    alignment.align(tower, 0, train, steps=3, batch_size=8, learning_rate=1e-2, output_dir=tmp_path)
    assert all(torch.equal(v, projector_first[k]) for k, v in llava.model.multi_modal_projector.state_dict().items())


def test_a_model_that_knows_nothing_gets_vocabulary_perplexity_and_no_choice_hits(alignment):
    _, test = emoji_splits(True)
    head = alignment.model.lm_head
    saved = head.weight.detach().clone()
    try:
        with torch.no_grad():
            head.weight.zero_()  # every next token equally likely: all names tie
        metrics = alignment.evaluate(test, choices=4, seed=0)
    finally:
        with torch.no_grad():
            head.weight.copy_(saved)
    assert metrics["name_perplexity"] == pytest.approx(head.weight.shape[0], rel=1e-4)
    assert metrics["choice_accuracy"] == 0.0


@pytest.mark.slow
def test_the_demo_reports_alignment_per_tower_and_seed(tmp_path):
    import json

    result = run(DemoArguments(output_dir=str(tmp_path), smoke=True, stage2_seeds=[0, 1], llava_alignment=True))
    llava = json.loads(open(result["metrics"]).read())["llava_alignment"]
    assert set(llava["per_seed"]) == {"untrained", "raw", "tuned"}
    assert all(len(runs) == 2 for runs in llava["per_seed"].values())
    for pair in ("tuned_minus_raw", "raw_minus_untrained", "tuned_minus_untrained"):
        values = llava["summary"][pair]["choice_accuracy"]["values"]
        expected = [llava["per_seed"][pair.split("_minus_")[0]][i]["choice_accuracy"]
                    - llava["per_seed"][pair.split("_minus_")[1]][i]["choice_accuracy"] for i in range(2)]
        assert values == pytest.approx(expected)
