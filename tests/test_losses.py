"""The contrastive losses against naive per-example formulas, over simulated processes, and over two real
processes (gloo) whose gathered candidates carry gradients back to the process that owns them."""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from llm2clip_hf.trainers import CaptionContrastiveLoss, CLIPContrastiveLoss
from llm2clip_hf.trainers.losses import SigLIPContrastiveLoss

sys.path.insert(0, str(Path(__file__).parent))
import gather_worker  # noqa: E402
from launching import free_port  # noqa: E402


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def naive_caption_loss(query, positive, negative, scale):
    """-log softmax of query i against every positive and negative, target positive i, averaged."""
    q, p = _unit(query.double()), _unit(positive.double())
    candidates = [p] if negative is None else [p, _unit(negative.double())]
    candidates = torch.cat(candidates)
    total = 0.0
    for i in range(q.shape[0]):
        scores = [scale * float(q[i] @ c) for c in candidates]
        total += -(scores[i] - math.log(sum(math.exp(s) for s in scores)))
    return total / q.shape[0]


def naive_clip_loss(images, texts, logit_scale):
    """Mean of the image->text and text->image cross-entropies, row by row."""
    im, tx = _unit(images.double()), _unit(texts.double())
    scale = math.exp(float(logit_scale))
    n, total_i, total_t = im.shape[0], 0.0, 0.0
    for i in range(n):
        row = [scale * float(im[i] @ tx[j]) for j in range(n)]
        col = [scale * float(tx[i] @ im[j]) for j in range(n)]
        total_i += -(row[i] - math.log(sum(math.exp(s) for s in row)))
        total_t += -(col[i] - math.log(sum(math.exp(s) for s in col)))
    return (total_i + total_t) / (2 * n)


def naive_sigmoid_loss(images, texts, logit_scale, logit_bias):
    """SigLIP, pair by pair: -log sigmoid(+logit) for pair (i, i), -log sigmoid(-logit) for (i, j != i), with
    logit = exp(logit_scale) * cos + logit_bias; summed over all pairs, divided by the number of images."""
    im, tx = _unit(images.double()), _unit(texts.double())
    scale, bias = math.exp(float(logit_scale)), float(logit_bias)
    total = 0.0
    for i in range(im.shape[0]):
        for j in range(tx.shape[0]):
            z = (1.0 if i == j else -1.0) * (scale * float(im[i] @ tx[j]) + bias)
            total += math.log1p(math.exp(-z))  # -log sigmoid(z)
    return total / im.shape[0]


def split_gather(chunks, rank):
    """A simulated all-gather: the other ranks' chunks as constants, this rank's chunk live."""
    def gather(local):
        parts = [local if r == rank else chunks[r].detach() for r in range(len(chunks))]
        return torch.cat(parts), sum(c.shape[0] for c in chunks[:rank])
    return gather


@pytest.mark.parametrize("with_negatives", [True, False])
def test_caption_loss_matches_naive_formula(with_negatives):
    torch.manual_seed(0)
    q, p, n = torch.randn(6, 16), torch.randn(6, 16), torch.randn(6, 16)
    loss = CaptionContrastiveLoss(scale=50.0)(q, p, n if with_negatives else None)
    expected = naive_caption_loss(q, p, n if with_negatives else None, 50.0)
    assert abs(loss.item() - expected) < 1e-4 * max(1.0, expected)


@pytest.mark.parametrize("with_negatives", [True, False])
def test_centered_caption_loss_is_the_naive_formula_on_centered_embeddings_and_blind_to_a_shared_component(
        with_negatives):
    torch.manual_seed(3)
    q, p, n = torch.randn(6, 16), torch.randn(6, 16), torch.randn(6, 16)
    parts = [q, p] + ([n] if with_negatives else [])
    mean = torch.cat(parts).mean(0)
    loss = CaptionContrastiveLoss(scale=50.0, center=True)(q, p, n if with_negatives else None)
    expected = naive_caption_loss(q - mean, p - mean, (n - mean) if with_negatives else None, 50.0)
    assert abs(loss.item() - expected) < 1e-4 * max(1.0, expected)
    shared = 1e3 * torch.randn(16)  # swamps every embedding: the plain loss sits near ln(candidates)
    shifted = CaptionContrastiveLoss(scale=50.0, center=True)(q + shared, p + shared,
                                                               (n + shared) if with_negatives else None)
    assert shifted.item() == pytest.approx(loss.item(), rel=1e-3)
    plain = CaptionContrastiveLoss(scale=50.0)(q + shared, p + shared, (n + shared) if with_negatives else None)
    candidates = 12 if with_negatives else 6
    assert plain.item() == pytest.approx(math.log(candidates), rel=0.05)


@pytest.mark.parametrize("sizes", [(4, 4), (3, 5)])
def test_centered_caption_loss_over_simulated_ranks_averages_to_global_loss(sizes):
    """The mean subtracted is the global batch's: each rank gathers every rank's embeddings for it."""
    torch.manual_seed(4)
    total = sum(sizes)
    q, p, n = torch.randn(total, 8) + 2.0, torch.randn(total, 8) + 2.0, torch.randn(total, 8) + 2.0
    global_loss = CaptionContrastiveLoss(world_size=1, center=True)(q, p, n)
    mean = torch.cat([q, p, n]).mean(0)
    bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    local_chunks = [torch.cat([q[a:b], p[a:b], n[a:b]]) for a, b in zip(bounds, bounds[1:])]
    p_chunks = [_unit(p[a:b] - mean) for a, b in zip(bounds, bounds[1:])]
    n_chunks = [_unit(n[a:b] - mean) for a, b in zip(bounds, bounds[1:])]
    weighted = 0.0
    for rank, (a, b) in enumerate(zip(bounds, bounds[1:])):
        gathers = iter([split_gather(local_chunks, rank), split_gather(p_chunks, rank), split_gather(n_chunks, rank)])
        loss = CaptionContrastiveLoss(world_size=len(sizes), rank=rank, gather=lambda t: next(gathers)(t),
                                      center=True)
        weighted += loss(q[a:b], p[a:b], n[a:b]).item() * (b - a) / total
    assert abs(weighted - global_loss.item()) < 1e-5


def test_clip_loss_matches_naive_formula():
    torch.manual_seed(1)
    images, texts = torch.randn(5, 12), torch.randn(5, 12)
    scale = torch.tensor(math.log(10.0))
    assert abs(CLIPContrastiveLoss()(images, texts, scale).item() - naive_clip_loss(images, texts, scale)) < 1e-5


@pytest.mark.parametrize("sizes", [(4, 4), (3, 5), (2, 2, 4)])
def test_caption_loss_over_simulated_ranks_averages_to_global_loss(sizes):
    """Each rank scores its queries against the gathered candidates; weighting the ranks' losses by their share
    of queries gives the one-process loss on the global batch (equal shares: the plain mean, as DDP takes)."""
    torch.manual_seed(2)
    total = sum(sizes)
    q, p, n = torch.randn(total, 8), torch.randn(total, 8), torch.randn(total, 8)
    global_loss = CaptionContrastiveLoss(world_size=1)(q, p, n)
    bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    p_chunks = [_unit(p[a:b]) for a, b in zip(bounds, bounds[1:])]
    n_chunks = [_unit(n[a:b]) for a, b in zip(bounds, bounds[1:])]
    weighted = 0.0
    for rank, (a, b) in enumerate(zip(bounds, bounds[1:])):
        gathers = iter([split_gather(p_chunks, rank), split_gather(n_chunks, rank)])
        loss = CaptionContrastiveLoss(world_size=len(sizes), rank=rank, gather=lambda t: next(gathers)(t))
        weighted += loss(q[a:b], p[a:b], n[a:b]).item() * (b - a) / total
    assert abs(weighted - global_loss.item()) < 1e-5


def test_clip_loss_over_simulated_ranks_does_not_scale_with_world_size():
    torch.manual_seed(3)
    images, texts, scale = torch.randn(8, 8), torch.randn(8, 8), torch.tensor(2.0)
    global_loss = CLIPContrastiveLoss()(images, texts, scale).item()
    for world_size in (2, 4):
        per = 8 // world_size
        im_chunks = list(images.split(per))
        tx_chunks = list(texts.split(per))
        losses = []
        for rank in range(world_size):
            gathers = iter([split_gather([_unit(c) for c in im_chunks], rank),
                            split_gather([_unit(c) for c in tx_chunks], rank)])
            loss = CLIPContrastiveLoss(world_size=world_size, rank=rank, gather=lambda t: next(gathers)(t))
            losses.append(loss(im_chunks[rank], tx_chunks[rank], scale).item())
        assert abs(sum(losses) / world_size - global_loss) < 1e-5


@pytest.mark.parametrize("logit_scale, logit_bias", [(math.log(10.0), -10.0), (2.0, -1.5)])
def test_sigmoid_loss_matches_naive_formula(logit_scale, logit_bias):
    """At SigLIP's init (scale 10, bias -10) and at a trained-like point; unnormalised inputs (the loss normalises)."""
    torch.manual_seed(4)
    images, texts = 3 * torch.randn(6, 12), torch.randn(6, 12)
    scale, bias = torch.tensor(logit_scale), torch.tensor(logit_bias)
    loss = SigLIPContrastiveLoss()(images, texts, scale, bias).item()
    expected = naive_sigmoid_loss(images, texts, scale, bias)
    assert loss == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("sizes", [(4, 4), (2, 2, 2, 2), (3, 5), (2, 2, 4)])
def test_sigmoid_loss_over_simulated_ranks_equals_global_loss(sizes):
    """Each rank scores its images against every rank's texts (positives at its offset). Equal shares: the plain
    mean of the ranks' losses (as DDP averages) is the one-process loss on the global batch, for any world size;
    uneven shares: the ranks' losses weighted by their share of images."""
    torch.manual_seed(6)
    total = sum(sizes)
    images, texts = torch.randn(total, 8), torch.randn(total, 8)
    scale, bias = torch.tensor(2.3), torch.tensor(-3.0)
    global_loss = SigLIPContrastiveLoss()(images, texts, scale, bias).item()
    bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    tx_chunks = [_unit(texts[a:b]) for a, b in zip(bounds, bounds[1:])]
    losses = []
    for rank, (a, b) in enumerate(zip(bounds, bounds[1:])):
        loss = SigLIPContrastiveLoss(world_size=len(sizes), rank=rank, gather=split_gather(tx_chunks, rank))
        losses.append(loss(images[a:b], texts[a:b], scale, bias).item())
    weighted = sum(loss * (b - a) / total for loss, a, b in zip(losses, bounds, bounds[1:]))
    assert weighted == pytest.approx(global_loss, rel=1e-6)
    if len(set(sizes)) == 1:
        assert sum(losses) / len(sizes) == pytest.approx(global_loss, rel=1e-6)


def test_sigmoid_loss_needs_a_logit_bias():
    with pytest.raises(ValueError, match="logit_bias_init_value=-10.0"):
        SigLIPContrastiveLoss()(torch.randn(2, 4), torch.randn(2, 4), torch.tensor(1.0), None)


def test_loss_rejects_rank_outside_world():
    with pytest.raises(ValueError, match="outside world_size"):
        CLIPContrastiveLoss(world_size=2, rank=2)


# --------------------------------------------------------------------------------------------------------------
# Two real processes: the package's all-gather (forward all_gather, backward all-reduce SUM + own slice).
#
# Rank r returns L_r = mean over its own n_r queries of the per-query loss l_i, whose candidates are the rows of
# every rank. The gather's backward sums, over ranks, the gradient of each rank's loss w.r.t. the gathered rows
# and hands rank r its slice, so after every rank calls L_r.backward() the gradient of rank r's local rows is
#     g_r = d(L_0 + ... + L_{W-1}) / d e_r,   L_r = (1 / n_r) * sum_{i in r} l_i,
# where the l_i are the one-process per-query losses on the concatenated global batch.
# * Equal shares (n_r = N / W): sum_r L_r = W * L_global with L_global = (1 / N) sum_i l_i, the one-process loss,
#   so g_r = W * dL_global / de_r; DDP then averages the ranks' parameter gradients (divides by W) and
#   recovers dL_global / dtheta exactly.
# * Uneven shares: g_r = d(sum_r L_r) / de_r, which weights rank r's queries by 1 / n_r (not 1 / N); the losses
#   themselves still combine to the global one with weights n_r / N.
# logit_scale (and SigLIP's logit_bias) are replicated, not gathered: their gradient on rank r is dL_r / d param.
# SigLIP gathers only the texts: rank r's images meet every rank's texts, so each pair of the global batch is scored
# on exactly one rank and l_i = sum_j -log sigmoid(label_ij * logit_ij) is image i's row of the global batch.
# --------------------------------------------------------------------------------------------------------------

WORLD_SIZE = 2
SHARES = {"equal": (4, 4), "uneven": (3, 5)}


def caption_query_losses(query, positive, negative, scale):
    """Per-query stage-1 loss on one process, plain torch: query i against every positive (and negative),
    target positive i."""
    candidates = _unit(positive) if negative is None else torch.cat([_unit(positive), _unit(negative)])
    log_probs = (scale * _unit(query) @ candidates.t()).log_softmax(dim=-1)
    rows = torch.arange(query.shape[0])
    return -log_probs[rows, rows]


def clip_query_losses(images, texts, logit_scale):
    """Per-pair stage-2 loss on one process, plain torch: the mean of pair i's image->text and text->image terms."""
    logits = logit_scale.exp() * _unit(images) @ _unit(texts).t()
    rows = torch.arange(images.shape[0])
    return -0.5 * (logits.log_softmax(dim=1)[rows, rows] + logits.t().log_softmax(dim=1)[rows, rows])


def sigmoid_query_losses(images, texts, logit_scale, logit_bias):
    """Per-image SigLIP loss on one process, plain torch: the sum over image i's row of pairs (positive: pair i)."""
    logits = logit_scale.exp() * _unit(images) @ _unit(texts).t() + logit_bias
    labels = 2 * torch.eye(images.shape[0], dtype=logits.dtype) - 1
    return -torch.nn.functional.logsigmoid(labels * logits).sum(dim=1)


REPLICATED = ("logit_scale", "logit_bias")


def make_cases():
    """A fixed global batch per case (float32, as training holds them), split between the ranks by ``sizes``."""
    generator = torch.Generator().manual_seed(5)
    cases = {}
    for share, sizes in SHARES.items():
        total = sum(sizes)
        for negatives in (True, False):
            names = ["query", "positive"] + (["negative"] if negatives else [])
            cases[f"caption_{'with' if negatives else 'without'}_negatives_{share}"] = {
                "loss": "caption", "sizes": sizes, "scale": 50.0,
                "tensors": {n: torch.randn(total, 16, generator=generator) for n in names},
            }
        cases[f"clip_{share}"] = {
            "loss": "clip", "sizes": sizes, "logit_scale": torch.tensor(math.log(1 / 0.07)),
            "tensors": {n: torch.randn(total, 16, generator=generator) for n in ("image", "text")},
        }
        # scale 10 as SigLIP starts; bias -2 rather than its -10, so negatives carry gradient comparable to positives
        cases[f"siglip_{share}"] = {
            "loss": "siglip", "sizes": sizes, "logit_scale": torch.tensor(math.log(10.0)),
            "logit_bias": torch.tensor(-2.0),
            "tensors": {n: torch.randn(total, 16, generator=generator) for n in ("image", "text")},
        }
    return cases


def expected_per_rank(case):
    """What each rank must return and hold after backward, from one process on the global batch (float64)."""
    leaves = {n: t.double().requires_grad_(True) for n, t in case["tensors"].items()}
    sizes = case["sizes"]
    bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    if case["loss"] == "caption":
        per_query = caption_query_losses(leaves["query"], leaves["positive"], leaves.get("negative"), case["scale"])
        naive = naive_caption_loss(*(case["tensors"].get(n) for n in ("query", "positive", "negative")),
                                   case["scale"])
    elif case["loss"] == "clip":
        leaves["logit_scale"] = case["logit_scale"].double().requires_grad_(True)
        per_query = clip_query_losses(leaves["image"], leaves["text"], leaves["logit_scale"])
        naive = naive_clip_loss(case["tensors"]["image"], case["tensors"]["text"], case["logit_scale"])
    else:
        for name in REPLICATED:
            leaves[name] = case[name].double().requires_grad_(True)
        per_query = sigmoid_query_losses(leaves["image"], leaves["text"], leaves["logit_scale"], leaves["logit_bias"])
        naive = naive_sigmoid_loss(case["tensors"]["image"], case["tensors"]["text"], case["logit_scale"],
                                   case["logit_bias"])
    global_loss = per_query.mean()
    # the plain-torch reference is the naive per-example formula on the global batch
    assert global_loss.item() == pytest.approx(naive, rel=1e-9)
    rank_losses = [per_query[a:b].mean() for a, b in zip(bounds, bounds[1:])]
    embeddings = [n for n in leaves if n not in REPLICATED]
    if len(set(sizes)) == 1:
        total_grads = torch.autograd.grad(global_loss, [leaves[n] for n in embeddings], retain_graph=True)
        total_grads = [len(sizes) * g for g in total_grads]
    else:
        total_grads = torch.autograd.grad(sum(rank_losses), [leaves[n] for n in embeddings], retain_graph=True)
    expected = []
    for rank, (a, b) in enumerate(zip(bounds, bounds[1:])):
        grads = {n: g[a:b] for n, g in zip(embeddings, total_grads)}
        for name in REPLICATED:
            if name in leaves:
                grads[name] = torch.autograd.grad(rank_losses[rank], leaves[name], retain_graph=True)[0]
        expected.append({"loss": rank_losses[rank].detach(), "grads": grads})
    return expected, naive


def close_to(actual, expected, rel=1e-5):
    """max |actual - expected| <= rel * max |expected|, with the numbers for the failure message."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape
    error, bound = (actual - expected).abs().max().item(), rel * expected.abs().max().item()
    return error <= bound, f"max|diff| {error:.3g} > {bound:.3g} (= {rel} * max|expected|)"


def check_losses(case, results, expected, naive):
    sizes = case["sizes"]
    for rank, (result, want) in enumerate(zip(results, expected)):
        ok, detail = close_to(result["loss"], want["loss"])
        assert ok, f"rank {rank} loss: {detail}"
    # the ranks' losses, weighted by their share of queries, are the one-process loss of the global batch
    combined = sum(r["loss"].item() * n / sum(sizes) for r, n in zip(results, sizes))
    assert combined == pytest.approx(naive, rel=1e-5)


def check_gradients(results, expected):
    for rank, (result, want) in enumerate(zip(results, expected)):
        assert result["grads"].keys() == want["grads"].keys()
        for name, grad in want["grads"].items():
            assert grad.abs().max() > 0
            ok, detail = close_to(result["grads"][name], grad)
            assert ok, f"rank {rank} gradient of {name}: {detail}"


def start_method() -> str:
    """``fork``: the workers inherit the imported package and finish in about a second (autograd on CPU works in
    forked children). ``spawn`` (each worker imports the package anew, ~10 s of CPU each) once CUDA was initialised
    here, whose autograd threads do not survive a fork, or when this process already joined a process group."""
    if torch.cuda.is_initialized() or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return "spawn"
    return "fork"


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    """Runs tests/gather_worker.py in two processes (gloo over TCP on localhost) on every case, once."""
    directory = tmp_path_factory.mktemp("gather")
    cases = make_cases()
    torch.save(cases, directory / "inputs.pt")
    context = mp.get_context(start_method())
    port = free_port()
    processes = [context.Process(target=gather_worker.main,
                                 args=(rank, WORLD_SIZE, port, str(directory / "inputs.pt"), str(directory)))
                 for rank in range(WORLD_SIZE)]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join(timeout=120)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
    errors = [p.read_text() for p in sorted(directory.glob("rank*.error"))]
    assert not errors and all(p.exitcode == 0 for p in processes), (
        [p.exitcode for p in processes], "\n".join(errors))
    results = [torch.load(directory / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    return cases, results


@pytest.mark.parametrize("case_name", list(make_cases()))
def test_two_processes_losses_and_gradients_through_the_real_gather(two_process_results, case_name):
    """Each rank's loss, and the gradient of its local embeddings (and logit_scale, logit_bias) after backward of
    its own loss, against one process on the global batch (see the derivation above)."""
    cases, results = two_process_results
    case = cases[case_name]
    per_rank = [r["package", case_name] for r in results]
    expected, naive = expected_per_rank(case)
    check_losses(case, per_rank, expected, naive)
    check_gradients(per_rank, expected)


@pytest.mark.parametrize("variant", ["no_reduction", "detached"])
@pytest.mark.parametrize("case_name", list(make_cases()))
def test_two_process_checks_catch_a_gather_without_gradient_reduction(two_process_results, case_name, variant):
    """The checks above can fail: with a gather whose backward skips the reduction over processes (or that gathers the other
    rank's rows as constants) the losses are unchanged but the gradients are wrong, and check_gradients says so."""
    cases, results = two_process_results
    per_rank = [r[variant, case_name] for r in results]
    expected, naive = expected_per_rank(cases[case_name])
    check_losses(cases[case_name], per_rank, expected, naive)
    with pytest.raises(AssertionError, match="gradient of"):
        check_gradients(per_rank, expected)
