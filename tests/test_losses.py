"""The contrastive losses against naive per-example formulas, and their behaviour over simulated processes."""

import math

import pytest
import torch

from llm2clip_hf.trainers import CaptionContrastiveLoss, CLIPContrastiveLoss


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


def test_loss_rejects_rank_outside_world():
    with pytest.raises(ValueError, match="outside world_size"):
        CLIPContrastiveLoss(world_size=2, rank=2)
