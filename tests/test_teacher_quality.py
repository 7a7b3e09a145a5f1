"""The teacher check: statistics that tell a usable stage-2 teacher from one dominated by a common component and from
a degenerate one, checked against direct computations and on degenerate inputs; the trainer and the CLI act on it."""

import math

import numpy as np
import pytest
import torch
from datasets import Dataset

from llm2clip_hf import LLM2CLIPModel
from llm2clip_hf.data import cached_embedding_sample, embedding_column, precompute_text_embeddings
from llm2clip_hf.evaluation import caption_retrieval_metrics, evaluate_teacher, teacher_statistics
from llm2clip_hf.evaluation.teacher_quality import DEGENERATE, DOMINATED, HEALTHY, MIN_CHECKED_CAPTIONS, SKIPPED, \
    auto_adapter_input_normalization, check_cached_teacher, check_teacher, effective_rank
from llm2clip_hf.testing import tiny_caption_pair_rows, tiny_image_caption_rows, tiny_vision_config
from llm2clip_hf.trainers import LLM2CLIPTrainer, LLM2CLIPTrainingArguments

DIM = 32


def common_plus_residual(rows: int, residual: float, seed: int = 0) -> torch.Tensor:
    """One shared direction of norm 1 plus isotropic residuals of RMS norm ``residual``."""
    generator = torch.Generator().manual_seed(seed)
    common = torch.zeros(DIM)
    common[0] = 1.0
    return common + residual * torch.randn(rows, DIM, generator=generator) / math.sqrt(DIM)


def test_statistics_equal_a_direct_computation():
    x = common_plus_residual(50, 0.8)
    stats = teacher_statistics(x)
    unit = x.double().numpy() / np.linalg.norm(x.double().numpy(), axis=1, keepdims=True)
    pairs = [unit[i] @ unit[j] for i in range(50) for j in range(50) if i != j]
    assert stats.mean_cosine == pytest.approx(np.mean(pairs), abs=1e-9)
    assert stats.std_cosine == pytest.approx(np.std(pairs, ddof=1), abs=1e-9)
    centered = x.double().numpy() - x.double().numpy().mean(0)
    assert stats.residual_share == pytest.approx(
        math.sqrt((centered ** 2).sum(1).mean() / (x.double().numpy() ** 2).sum(1).mean()), rel=1e-9)
    assert effective_rank(torch.eye(5)) == pytest.approx(5.0)  # five orthonormal directions
    assert effective_rank(torch.ones(7, 3)) == pytest.approx(1.0)  # one direction


def test_verdicts_on_spread_dominated_and_degenerate_embeddings():
    spread = torch.randn(200, DIM, generator=torch.Generator().manual_seed(0))
    assert teacher_statistics(spread).verdict == HEALTHY
    dominated = teacher_statistics(common_plus_residual(200, 0.05))  # mean cosine ~0.997, residual informative
    assert dominated.mean_cosine > 0.99 and dominated.centered_effective_rank > 10
    assert dominated.verdict == DOMINATED
    for name, degenerate in {
        "constant": torch.full((100, DIM), 0.3),
        "zero": torch.zeros(100, DIM),
        "two duplicated vectors": torch.cat([torch.randn(1, DIM).repeat(50, 1), torch.randn(1, DIM).repeat(50, 1)]),
    }.items():
        assert teacher_statistics(degenerate).verdict == DEGENERATE, name
    # a residual of 1e-4 carries information in float32, none once stored in bfloat16 (eps 7.8e-3)
    tiny = common_plus_residual(200, 1e-4)
    assert teacher_statistics(tiny).verdict == DOMINATED
    assert teacher_statistics(tiny, precision=torch.finfo(torch.bfloat16).eps).verdict == DEGENERATE


def test_statistics_refuse_non_finite_values():
    with pytest.raises(ValueError, match="NaN"):
        teacher_statistics(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="N >= 1"):
        teacher_statistics(torch.ones(0, 4))


@pytest.mark.parametrize("rows", [1, 2, 3, MIN_CHECKED_CAPTIONS - 1])
def test_too_few_captions_skip_the_check_instead_of_refusing(rows):
    """N captions span at most N - 1 directions once centered: 2 captions looked degenerate and 1 was an error.
    Below MIN_CHECKED_CAPTIONS (scripts/experiments/teacher_check_edges.py) the check is skipped and says so."""
    for embeddings in (torch.randn(rows, DIM, generator=torch.Generator().manual_seed(rows)), torch.zeros(rows, DIM)):
        stats = teacher_statistics(embeddings)
        assert stats.verdict == SKIPPED and stats.rows == rows and stats.mean_cosine is None
        assert f"skipped: {rows} caption" in stats.describe() and str(MIN_CHECKED_CAPTIONS) in stats.describe()
        check_teacher(stats)  # never refused
        assert auto_adapter_input_normalization(stats) is None  # auto keeps the official adapter
        assert stats.as_dict()["verdict"] == SKIPPED
    assert teacher_statistics(torch.zeros(MIN_CHECKED_CAPTIONS, DIM)).verdict == DEGENERATE


def test_evaluate_teacher_reports_cra_raw_and_centered(text_model):
    rows = tiny_caption_pair_rows()
    data = Dataset.from_list(rows)
    report = evaluate_teacher(text_model, data, ["short_caption", "long_caption"])
    short = text_model.encode([r["short_caption"] for r in rows]).float()
    long = text_model.encode([r["long_caption"] for r in rows]).float()
    assert report["cra"] == pytest.approx(caption_retrieval_metrics(short, long)["cra"])
    mean = torch.cat([short, long]).mean(0)
    assert report["centered_cra"] == pytest.approx(caption_retrieval_metrics(short - mean, long - mean)["cra"])
    assert report["verdict"] in (HEALTHY, DOMINATED) and report["rows"] == 2 * len(rows)


def cache_with(text_model, replace, columns=("short_caption", "long_caption"), storage_dtype="float32"):
    """A real cache of the tiny image rows whose embedding vectors are replaced by ``replace(rows, dim)`` (one call per
    column; stored in ``storage_dtype``); the rows' caption hashes and the cache metadata stay, so every other check
    passes."""
    data = precompute_text_embeddings(Dataset.from_list(tiny_image_caption_rows()), text_model, list(columns),
                                      storage_dtype=storage_dtype)
    for column in columns:
        values = replace(len(data), text_model.config.llm_config.hidden_size).float()
        stored = values.bfloat16().view(torch.int16).numpy().view(np.uint16) if storage_dtype == "bfloat16" \
            else values.numpy()
        feature = data.features[embedding_column(column)]
        data = data.remove_columns(embedding_column(column)).add_column(embedding_column(column), list(stored),
                                                                       feature=feature)
    return data


def stage2(text_model, data, tmp_path, teacher_statistics=None, **settings):
    model = LLM2CLIPModel.from_text_model(text_model, tiny_vision_config(), embed_text_model=False, projection_dim=32)
    args = LLM2CLIPTrainingArguments(output_dir=str(tmp_path), stage="clip", max_steps=1, per_device_train_batch_size=8,
                                     use_cpu=True, save_strategy="no", report_to="none", disable_tqdm=True, **settings)
    return LLM2CLIPTrainer(model=model, args=args, train_dataset=data, text_model=text_model,
                           teacher_statistics=teacher_statistics)


def test_trainer_refuses_a_degenerate_teacher_unless_allowed(text_model, tmp_path):
    data = cache_with(text_model, lambda rows, dim: torch.full((rows, dim), 0.5))
    embeddings = cached_embedding_sample(data, ["short_caption", "long_caption"]).embeddings
    assert torch.equal(embeddings, torch.full_like(embeddings, 0.5))
    with pytest.raises(ValueError, match="no spread left, even after centering.*allow_degenerate_teacher=True"):
        stage2(text_model, data, tmp_path)
    trainer = stage2(text_model, data, tmp_path, allow_degenerate_teacher=True)
    assert trainer.teacher_statistics.verdict == DEGENERATE


def test_cli_auto_centers_a_new_adapter_for_a_dominated_teacher_only(text_model, tmp_path):
    from llm2clip_hf.cli.arguments import ClipModelArguments
    from llm2clip_hf.cli.training_run import new_adapter_input_normalization

    args = LLM2CLIPTrainingArguments(output_dir=str(tmp_path), stage="clip", use_cpu=True, report_to="none")
    dominated = cache_with(text_model, lambda rows, dim: torch.cat([common_plus_residual(rows, 0.05),
                                                                    torch.zeros(rows, dim - DIM)], 1))
    healthy = cache_with(text_model,
                         lambda rows, dim: torch.randn(rows, dim, generator=torch.Generator().manual_seed(1)))
    degenerate = cache_with(text_model, lambda rows, dim: torch.zeros(rows, dim))
    new = ClipModelArguments()
    assert new.adapter_input_normalization == "auto"
    choice, statistics = new_adapter_input_normalization(new, dominated, args)
    assert choice == "center" and statistics.verdict == DOMINATED
    assert new_adapter_input_normalization(new, healthy, args)[0] is None
    with pytest.raises(ValueError, match="--allow-degenerate-teacher true"):
        new_adapter_input_normalization(new, degenerate, args)
    assert new_adapter_input_normalization(ClipModelArguments(adapter_input_normalization="none"), dominated,
                                           args) == (None, None)
    # the choice for a new adapter is made whatever the image side (a pretrained one may bring a new adapter too);
    # apply_adapter_input_normalization leaves an adapter that comes with the model as it is (tests/test_cli.py)
    choice, statistics = new_adapter_input_normalization(ClipModelArguments(vision_model="some/clip"), dominated, args)
    assert choice == "center" and statistics.verdict == DOMINATED


def test_trainer_uses_given_teacher_statistics_instead_of_measuring_again(text_model, tmp_path, monkeypatch):
    """The CLI measures the cache once to choose the adapter; the trainer reuses those numbers (and still refuses
    a degenerate teacher on them)."""
    import llm2clip_hf.trainers.stages as stages

    data = cache_with(text_model, lambda rows, dim: torch.randn(rows, dim, generator=torch.Generator().manual_seed(2)))
    measured = teacher_statistics(cached_embedding_sample(data, ["short_caption", "long_caption"]).embeddings)

    def measuring_again(*args, **kwargs):
        raise AssertionError("the teacher was measured twice")

    monkeypatch.setattr(stages, "check_cached_teacher", measuring_again)
    assert stage2(text_model, data, tmp_path, teacher_statistics=measured).teacher_statistics is measured
    degenerate = teacher_statistics(torch.zeros(MIN_CHECKED_CAPTIONS, 4))
    with pytest.raises(ValueError, match="no spread left"):
        stage2(text_model, data, tmp_path, teacher_statistics=degenerate)


def test_cli_teacher_task_and_embed_report_the_same_statistics(tiny_llm_dir, tmp_path, capsys):
    import json

    from llm2clip_hf import LLM2CLIPTextModel
    from llm2clip_hf.cli.commands import main

    rows = tiny_caption_pair_rows()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--text-model", str(tiny_llm_dir), "--dataset", str(pairs), "--caption-columns", "short_caption",
              "long_caption"]
    assert main(["evaluate", "--task", "teacher", *common, "--output-dir", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "metrics_teacher.json").read_text())
    capsys.readouterr()
    assert main(["embed", *common, "--output-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    embedded = json.loads(out[out.index("{\n"):])["teacher"]
    expected = teacher_statistics(torch.cat([
        LLM2CLIPTextModel.from_llm(tiny_llm_dir).encode([r[c] for r in rows]).float()
        for c in ("short_caption", "long_caption")]))
    for result in (report, embedded):
        assert result["verdict"] == expected.verdict
        assert result["mean_cosine"] == pytest.approx(expected.mean_cosine, abs=1e-4)
        assert result["centered_effective_rank"] == pytest.approx(expected.centered_effective_rank, rel=1e-3)
    assert "cra" in report and "centered_cra" in report


def test_a_spread_teacher_stored_in_bfloat16_is_not_degenerate():
    """bfloat16 rounds each value by ~0.4 %: a residual of 65 % of the norm (the tiny LLM's) is far above it."""
    x = common_plus_residual(200, 0.8)
    stats = teacher_statistics(x.bfloat16().float(), precision=torch.finfo(torch.bfloat16).eps)
    assert stats.residual_share > 0.5 and stats.verdict != DEGENERATE


BF16_EPS = torch.finfo(torch.bfloat16).eps


def collapsed_in_bfloat16(rows, dim, seed=0):
    """A collapsed teacher computed in bfloat16: one vector, perturbed far below bfloat16's resolution (1e-4 of its
    norm) and rounded to bfloat16 as the model's output is; returned in float32 (what a float32 cache stores)."""
    generator = torch.Generator().manual_seed(seed + 1)
    one = torch.randn(dim, generator=torch.Generator().manual_seed(0))  # the one vector every caption gets
    return (one + 1e-4 * one.norm() * torch.randn(rows, dim, generator=generator) / math.sqrt(dim)).bfloat16().float()


def test_a_collapse_computed_in_bfloat16_and_stored_in_float32_is_degenerate(tiny_llm_dir):
    """Judged against float32's precision (the storage), the rounding noise passed for a residual: "dominated", and
    auto centered it (the adapter fitted to noise). Against the precision it was computed in, it is noise; the
    cache records that dtype."""
    from llm2clip_hf import LLM2CLIPTextModel
    from llm2clip_hf.data import read_cache_metadata

    bf16_model = LLM2CLIPTextModel.from_llm(tiny_llm_dir, dtype=torch.bfloat16)
    for columns in (["long_caption"], ["short_caption", "long_caption"]):  # the precision rule; the pairs' CRA
        seeds = iter(range(2))  # the two captions of an image get their own rounding noise
        data = cache_with(bf16_model, lambda rows, dim: collapsed_in_bfloat16(rows, dim, next(seeds)), columns)
        assert read_cache_metadata(data)["text_model_dtype"] == "bfloat16"
        assert read_cache_metadata(data)["storage_dtype"] == "float32"
        stats = check_cached_teacher(data, columns, allow_degenerate=True)
        assert stats.mean_cosine > 0.999 and stats.residual_share > 0  # the rounding noise is there
        assert stats.verdict == DEGENERATE, columns
        with pytest.raises(ValueError, match="degenerate: what is left after centering is within the rounding noise"):
            check_cached_teacher(data, columns)
        sample = cached_embedding_sample(data, columns)
        assert sample.precision == torch.finfo(torch.float32).eps and sample.computed_precision == BF16_EPS
        assert (sample.pairs is None) == (len(columns) == 1)
    # the same numbers computed in float32 would be a (small) signal: 5e-4 of the norm against float32's 1e-7
    exact = collapsed_in_bfloat16(64, 64)
    assert teacher_statistics(exact).verdict == DOMINATED
    assert teacher_statistics(exact, computed_precision=BF16_EPS).verdict == DEGENERATE


def informative_pairs(rows, dim, residual, seed=0):
    """Two captions of each of ``rows`` images: a common direction of norm 1 plus a residual of RMS norm
    ``residual`` shared by the two captions of an image (each caption adds 20 % of its own)."""
    generator = torch.Generator().manual_seed(seed)
    common = torch.zeros(dim)
    common[0] = 1.0
    image = torch.randn(rows, dim, generator=generator)
    own = [0.2 * torch.randn(rows, dim, generator=generator) for _ in range(2)]
    return [common + residual * (image + o) / math.sqrt(dim) for o in own]


def test_an_informative_teacher_with_a_large_common_component_stored_in_bfloat16_is_not_refused(text_model):
    """Mean cosine >= 0.994 puts the residual below 10 x bfloat16's epsilon, which refused it as collapsed; but
    rounding is relative to each value, so the small residual survives bfloat16 storage: it stands above the
    rounding noise actually there (6 % of the norm), or (1 %) within it, where its centered pairs still retrieve each
    other, and that decides."""
    columns = ["short_caption", "long_caption"]
    for residual in (0.06, 0.01):
        pairs = iter(informative_pairs(32, text_model.config.llm_config.hidden_size, residual))
        data = cache_with(text_model, lambda rows, dim: next(pairs), columns, storage_dtype="bfloat16")
        stats = check_cached_teacher(data, columns)  # not refused
        sample = cached_embedding_sample(data, columns)
        assert sample.precision == BF16_EPS and sample.computed_precision == torch.finfo(torch.float32).eps
        assert stats.mean_cosine >= 0.994 and stats.residual_share < 10 * BF16_EPS
        assert stats.verdict == DOMINATED and auto_adapter_input_normalization(stats) == "center"
        mean = sample.embeddings.mean(0)
        assert caption_retrieval_metrics(sample.pairs[0] - mean, sample.pairs[1] - mean)["cra"] == 100.0
    # without pairs, a residual of 6 % of the norm stands well above the rounding noise actually there (the common
    # component's, ~0.2 % of the norm); one of 1 % does not, and only the pairs can tell
    for residual, verdict in ((0.06, DOMINATED), (0.01, DEGENERATE)):
        stored = torch.cat(informative_pairs(32, DIM, residual)).bfloat16().float()
        assert teacher_statistics(stored, precision=BF16_EPS).verdict == verdict
