"""The metric layer of the evaluation suite: hand-computed cases, ties (expected credit under random tie-breaking,
checked against an exhaustive-permutation reference), collapsed encoders scoring chance, chunking, a naive reference,
validation and the offline ``evaluate`` module."""

import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from llm2clip_hf.evaluation import (
    DEFAULT_TEMPLATES,
    build_classifier,
    caption_retrieval_accuracy,
    caption_retrieval_metrics,
    metric_path,
    rank_counts,
    retrieval_recall,
    zero_shot_accuracy,
)


def at_angles(*degrees: float) -> torch.Tensor:
    """Unit 2-D vectors at the given angles: the cosine similarity of two of them is cos(angle difference)."""
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1).float()


# Images at 0, 90 and 45 degrees; two captions each: t0 10, t1 75 (image 0), t2 100, t3 30 (image 1),
# t4 65, t5 -60 (image 2). Similarity falls with the angle between two vectors.
IMAGES = at_angles(0, 90, 45)
TEXTS = at_angles(10, 75, 100, 30, 65, -60)
TEXT_TO_IMAGE = [0, 0, 1, 1, 2, 2]
# Image -> text, angular distance to each caption, rank = captions strictly closer than the closest own caption
# (no ties here, so the rank decides every hit):
#   image 0: t0 10 (own) is the closest                                    -> rank 0
#   image 1: t2 10 (own) is the closest                                    -> rank 0
#   image 2: t3 15 (image 1) is closer than t4 20 (own)                    -> rank 1
IMAGE_RANKS = [0, 0, 1]
# Text -> image, angular distance to images 0 / 1 / 2:
#   t0: 10 / 80 / 35, own 0 -> rank 0       t1: 75 / 15 / 30, own 0 -> rank 2
#   t2: 100 / 10 / 55, own 1 -> rank 0      t3: 30 / 60 / 15, own 1 -> rank 2
#   t4: 65 / 25 / 20, own 2 -> rank 0       t5: 60 / 150 / 105, own 2 -> rank 1
TEXT_RANKS = [0, 2, 0, 2, 0, 1]


def test_hand_computed_ranks():
    image_counts = rank_counts(IMAGES, TEXTS, TEXT_TO_IMAGE, range(6))
    text_counts = rank_counts(TEXTS, IMAGES, range(6), TEXT_TO_IMAGE)
    assert [count.tolist() for count in image_counts] == [IMAGE_RANKS, [0] * 3, [1] * 3]
    assert [count.tolist() for count in text_counts] == [TEXT_RANKS, [0] * 6, [1] * 6]


def test_hand_computed_recall():
    metrics = retrieval_recall(IMAGES, TEXTS, TEXT_TO_IMAGE, ks=(1, 2, 3))
    expected = {
        "image_to_text_R@1": 100 * 2 / 3, "image_to_text_R@2": 100.0, "image_to_text_R@3": 100.0,
        "text_to_image_R@1": 100 * 3 / 6, "text_to_image_R@2": 100 * 4 / 6, "text_to_image_R@3": 100.0,
    }
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key


def test_default_ks_and_scale_invariance():
    metrics = retrieval_recall(3.0 * IMAGES, 0.5 * TEXTS, torch.tensor(TEXT_TO_IMAGE))
    assert list(metrics) == [f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
    assert metrics["image_to_text_R@1"] == pytest.approx(100 * 2 / 3)
    assert metrics["text_to_image_R@1"] == pytest.approx(50.0)
    assert metrics["text_to_image_R@10"] == 100.0  # k above the number of candidates is allowed


def test_any_correct_caption_counts_for_image_to_text():
    # Image 0 at 0 degrees has a bad caption (90, far) and a good one (5); image 1 (80) one caption at 85.
    # Image 0's best own caption is the closest of all captions -> hit although its other caption is poor.
    images, texts = at_angles(0, 80), at_angles(90, 5, 85)
    metrics = retrieval_recall(images, texts, [0, 0, 1], ks=(1,))
    assert metrics["image_to_text_R@1"] == 100.0
    # Caption 0 (90) is closer to image 1 (10 away) than to image 0 (90 away) -> one miss of three.
    assert metrics["text_to_image_R@1"] == pytest.approx(100 * 2 / 3)


def test_ties_give_expected_credit_and_ignore_order():
    # Images e_x and e_y. Caption 0 = caption 1 = (1, 1) / sqrt(2), captions of images 0 and 1; caption 2 = e_x.
    # Every similarity is exactly 0, 1 or 1/sqrt(2) (products with 0 and 1 are exact).
    # Image -> text: image 0 scores 1 with its own caption 2, above all -> hit. Image 1 (e_y) scores 1/sqrt(2)
    # with captions 0 (wrong) and 1 (own), 0 with caption 2: one wrong caption tied with its own -> 1/2.
    # Text -> image: captions 0 and 1 score 1/sqrt(2) with both images -> 1/2 each; caption 2 -> hit.
    images = torch.eye(2)
    texts = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    text_to_image = [0, 1, 0]
    image_counts = rank_counts(images, texts, text_to_image, range(3))
    assert [count.tolist() for count in image_counts] == [[0, 0], [0, 1], [1, 1]]
    text_counts = rank_counts(texts, images, range(3), text_to_image)
    assert [count.tolist() for count in text_counts] == [[0, 0, 0], [1, 1, 0], [1, 1, 1]]
    expected = {"image_to_text_R@1": 75.0, "image_to_text_R@2": 100.0,
                "text_to_image_R@1": 100 * 2 / 3, "text_to_image_R@2": 100.0}
    assert retrieval_recall(images, texts, text_to_image, ks=(1, 2)) == pytest.approx(expected, abs=1e-9)
    # Same captions in another order, and chunked one query at a time: same result.
    order = [2, 1, 0]
    permuted = retrieval_recall(images, texts[order], [text_to_image[i] for i in order], ks=(1, 2), chunk_size=1)
    assert permuted == pytest.approx(expected, abs=1e-9)


def test_strictly_greater_wrong_candidate_is_a_miss():
    # Images e_x, e_y; caption 0 = e_x (image 0), caption 1 = (1, 0.01) (image 1).
    # Text -> image: caption 1 scores 0.99995 with image 0 > 0.0099995 with its own image 1 -> rank 1, a miss.
    # Image -> text: image 0 scores 1 (own) vs 0.99995; image 1 scores 0 vs 0.0099995 (own) -> both hits.
    metrics = retrieval_recall(torch.eye(2), torch.tensor([[1.0, 0.0], [1.0, 0.01]]), [0, 1], ks=(1, 2))
    assert metrics == {"image_to_text_R@1": 100.0, "image_to_text_R@2": 100.0,
                       "text_to_image_R@1": 50.0, "text_to_image_R@2": 100.0}


# ------------------------------------------------------------------------------------------------------------
# Ties count by the expectation under random tie-breaking: collapsed encoders score chance, duplicates get
# fractional credit. References below are written independently of llm2clip_hf.evaluation.ranking.

def shuffled_hit_rates(queries, keys, correct, ks):
    """Brute-force reference: for every ordering of the keys, rank them by cosine similarity with a stable sort
    (tied keys keep the shuffled order) and record whether a correct key is in the top k; average over all
    orderings. ``correct`` is the ``[N_q, N_k]`` boolean matrix of correct keys; returns ``{k: [N_q] float64}``."""
    scores = (F.normalize(queries.double(), dim=-1)[:, None] * F.normalize(keys.double(), dim=-1)[None]).sum(-1)
    shuffles = torch.tensor(list(itertools.permutations(range(keys.shape[0]))))  # [P, N_k]
    num_queries, num_shuffles = scores.shape[0], shuffles.shape[0]
    order = torch.argsort(-scores[:, shuffles], dim=-1, stable=True)  # [N_q, P, N_k], positions in the shuffle
    ranked_keys = torch.gather(shuffles.expand(num_queries, -1, -1), 2, order)
    ranked_correct = torch.gather(correct[:, None, :].expand(-1, num_shuffles, -1), 2, ranked_keys)
    first_correct = ranked_correct.int().argmax(dim=-1)  # [N_q, P]
    return {k: (first_correct < k).double().mean(dim=1) for k in ks}


def reference_retrieval(images, texts, text_to_image, ks):
    """``retrieval_recall`` computed by :func:`shuffled_hit_rates` in both directions."""
    correct = torch.as_tensor(text_to_image)[None, :] == torch.arange(len(images))[:, None]  # [N_img, N_txt]
    image_hits = shuffled_hit_rates(images, texts, correct, ks)
    text_hits = shuffled_hit_rates(texts, images, correct.t(), ks)
    metrics = {f"image_to_text_R@{k}": 100 * image_hits[k].mean().item() for k in ks}
    metrics.update({f"text_to_image_R@{k}": 100 * text_hits[k].mean().item() for k in ks})
    return metrics


def chance_image_to_text(captions_per_image, k):
    """Recall@k (percent) of image->text retrieval when every caption ties: the chance that ``k`` positions drawn
    at random among all captions hold at least one of the image's own, averaged over images (hypergeometric)."""
    total = sum(captions_per_image)
    misses = [Fraction(math.comb(total - own, k), math.comb(total, k)) for own in captions_per_image]
    return float(100 * (1 - sum(misses) / len(misses)))


def collapsed(kind, rows, dim=16):
    """What a collapsed encoder outputs: one fixed random vector for every row, or all zeros. (With this vector, a
    CPU matrix product of one query against 7 keys can round the last columns differently; identical keys must
    still tie.)"""
    if kind == "zero":
        return torch.zeros(rows, dim)
    return torch.randn(dim, generator=torch.Generator().manual_seed(12)).expand(rows, dim).contiguous()


def separated(rows, dim=16, seed=0):
    """Well-separated embeddings and slightly perturbed copies of them (a good encoder)."""
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn(rows, dim, generator=generator)
    return embeds, embeds + 0.01 * torch.randn(rows, dim, generator=generator)


@pytest.mark.parametrize("kind", ["constant", "zero"])
def test_caption_retrieval_is_100_when_separated_and_chance_when_collapsed(kind):
    a, b = separated(7)
    assert caption_retrieval_metrics(a, b) == {"cra_a_to_b": 100.0, "cra_b_to_a": 100.0, "cra": 100.0}
    for chunk_size in (1, 3, 1024):
        metrics = caption_retrieval_metrics(collapsed(kind, 7), collapsed(kind, 7), chunk_size=chunk_size)
        assert metrics == pytest.approx({"cra_a_to_b": 100 / 7, "cra_b_to_a": 100 / 7, "cra": 100 / 7}, abs=1e-9)


@pytest.mark.parametrize("kind", ["constant", "zero"])
def test_retrieval_is_100_when_separated_and_chance_when_collapsed(kind):
    captions_per_image = [1, 3, 2, 5, 1]
    text_to_image = torch.repeat_interleave(torch.arange(5), torch.tensor(captions_per_image))
    images, _ = separated(5)
    texts = images[text_to_image] + 0.01 * torch.randn(len(text_to_image), 16, generator=torch.Generator())
    assert set(retrieval_recall(images, texts, text_to_image).values()) == {100.0}
    expected = {f"image_to_text_R@{k}": chance_image_to_text(captions_per_image, k) for k in (1, 5, 10)}
    expected.update({f"text_to_image_R@{k}": 100 * min(k, 5) / 5 for k in (1, 5, 10)})
    assert 0 < expected["image_to_text_R@1"] < expected["image_to_text_R@5"] < expected["image_to_text_R@10"] < 100
    for chunk_size in (1, 4, 1024):
        metrics = retrieval_recall(collapsed(kind, 5), collapsed(kind, 12), text_to_image, chunk_size=chunk_size)
        assert metrics == pytest.approx(expected, abs=1e-9), chunk_size


@pytest.mark.parametrize("kind", ["constant", "zero"])
def test_zero_shot_is_100_when_separated_and_chance_when_collapsed(kind):
    labels = torch.arange(20) % 10
    classifier, _ = separated(10)
    images = classifier[labels] + 0.01 * torch.randn(20, 16, generator=torch.Generator())
    assert set(zero_shot_accuracy(images, labels, classifier).values()) == {100.0}
    expected = {"zeroshot_top1": 10.0, "zeroshot_top5": 50.0, "mean_per_class_recall": 10.0}
    for chunk_size in (1, 3, 1024):
        metrics = zero_shot_accuracy(collapsed(kind, 20), labels, collapsed(kind, 10), chunk_size=chunk_size)
        assert metrics == pytest.approx(expected, abs=1e-9), chunk_size


# Images I0 = I1 = e_x (duplicates), I2 = e_y. Captions: c0 = c1 = c4 = (1, 0.2) (of images 0, 1 and 2),
# c2 = (0.2, 1) (image 2), c3 = (1, 0.5) (image 0).
#   image -> text: I0 ties its own c0 with c1, c4 (above c3) -> 1/3 at k=1, 2/3 at k=2; same for I1 (own c1);
#                  I2 -> c2 first -> hit. R@1 = (1/3 + 1/3 + 1) / 3, R@2 = (2/3 + 2/3 + 1) / 3, R@3 = 100.
#   text -> image: c0, c1, c3 tie I0 with I1 -> 1/2 at k=1; c2 -> I2 first; c4 has I0, I1 above I2 -> hit at 3.
DUPLICATE_IMAGES = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
DUPLICATE_TEXTS = torch.tensor([[1.0, 0.2], [1.0, 0.2], [0.2, 1.0], [1.0, 0.5], [1.0, 0.2]])
DUPLICATE_TEXT_TO_IMAGE = torch.tensor([0, 1, 2, 0, 2])


def test_duplicates_get_fractional_credit_in_retrieval():
    ks = (1, 2, 3, 4)
    expected = reference_retrieval(DUPLICATE_IMAGES, DUPLICATE_TEXTS, DUPLICATE_TEXT_TO_IMAGE, ks)
    assert expected == pytest.approx({
        "image_to_text_R@1": 100 * 5 / 9, "image_to_text_R@2": 100 * 7 / 9, "image_to_text_R@3": 100.0,
        "image_to_text_R@4": 100.0, "text_to_image_R@1": 50.0, "text_to_image_R@2": 80.0,
        "text_to_image_R@3": 100.0, "text_to_image_R@4": 100.0,
    }, abs=1e-12)
    text_order, image_order = [3, 0, 4, 2, 1], [2, 0, 1]
    new_image = torch.argsort(torch.tensor(image_order))  # old image index -> its position in image_order
    for chunk_size in (1, 2, 1024):
        metrics = retrieval_recall(DUPLICATE_IMAGES, DUPLICATE_TEXTS, DUPLICATE_TEXT_TO_IMAGE, ks=ks,
                                   chunk_size=chunk_size)
        assert metrics == pytest.approx(expected, abs=1e-9), chunk_size
        # The same data with the captions and the images listed in other orders.
        shuffled = retrieval_recall(DUPLICATE_IMAGES[image_order], DUPLICATE_TEXTS[text_order],
                                    new_image[DUPLICATE_TEXT_TO_IMAGE[text_order]], ks=ks, chunk_size=chunk_size)
        assert shuffled == pytest.approx(expected, abs=1e-9), chunk_size


# A pool of a few directions: drawing embeddings from it yields many exact ties and duplicates.
POOL = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [1.0, -1.0]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tie_heavy_random_cases_match_the_permutation_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    images = POOL[torch.randint(len(POOL), (4,), generator=generator)]
    texts = POOL[torch.randint(len(POOL), (6,), generator=generator)]
    text_to_image = torch.cat([torch.arange(4), torch.randint(4, (2,), generator=generator)])
    ks = (1, 2, 3)
    expected = reference_retrieval(images, texts, text_to_image, ks)
    for chunk_size in (1, 3, 1024):
        assert retrieval_recall(images, texts, text_to_image, ks=ks, chunk_size=chunk_size) == pytest.approx(
            expected, abs=1e-9)
    queries, keys = POOL[torch.randint(len(POOL), (2, 7), generator=generator)]
    own = shuffled_hit_rates(queries, keys, torch.eye(7, dtype=torch.bool), (1,))[1]
    assert caption_retrieval_accuracy(queries, keys, chunk_size=3) == pytest.approx(100 * own.mean().item(), abs=1e-9)


def test_duplicate_classes_get_fractional_credit_in_zero_shot():
    # Classes 0 and 1 share one embedding (e_x), class 2 is e_y, class 3 is -e_x.
    #   (1, 0.1) labelled 0 or 1: ties with the twin class -> 1/2 at top-1, hit at top-2.
    #   (0.1, 1) labelled 2: hit. (1, 0.1) labelled 2: classes 0, 1 above -> hit only at top-3.
    #   (-1, 0.2) labelled 3: hit. (1, 1) labelled 2: ties classes 0, 1 and 2 -> 1/3 at top-1, 2/3 at top-2.
    classifier = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    images = torch.tensor([[1.0, 0.1], [1.0, 0.1], [0.1, 1.0], [1.0, 0.1], [-1.0, 0.2], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 2, 2, 3, 2])
    hits = shuffled_hit_rates(images, classifier, labels[:, None] == torch.arange(4)[None, :], (1, 2))
    per_class = [hits[1][labels == label].mean().item() for label in range(4)]
    expected = {"zeroshot_top1": 100 * hits[1].mean().item(), "zeroshot_top2": 100 * hits[2].mean().item(),
                "mean_per_class_recall": 100 * sum(per_class) / 4}
    assert expected == pytest.approx({"zeroshot_top1": 100 * (3 + 1 / 3) / 6, "zeroshot_top2": 100 * (4 + 2 / 3) / 6,
                                      "mean_per_class_recall": 100 * (1 / 2 + 1 / 2 + 4 / 9 + 1) / 4}, abs=1e-12)
    class_order = torch.tensor([2, 3, 1, 0])
    new_label = torch.argsort(class_order)
    for chunk_size in (1, 4, 1024):
        assert zero_shot_accuracy(images, labels, classifier, ks=(1, 2), chunk_size=chunk_size) == pytest.approx(
            expected, abs=1e-9)
        assert zero_shot_accuracy(images, new_label[labels], classifier[class_order], ks=(1, 2),
                                  chunk_size=chunk_size) == pytest.approx(expected, abs=1e-9)


def random_retrieval(seed: int, num_images: int = 23, dim: int = 8, max_captions: int = 4):
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, max_captions + 1, (num_images,), generator=generator)
    text_to_image = torch.repeat_interleave(torch.arange(num_images), counts)
    text_to_image = text_to_image[torch.randperm(len(text_to_image), generator=generator)]
    images = torch.randn(num_images, dim, generator=generator)
    texts = images[text_to_image] + 1.5 * torch.randn(len(text_to_image), dim, generator=generator)
    return images, texts, text_to_image


def naive_recall(images, texts, text_to_image, ks):
    """Full similarity matrix and argsort; valid when no scores tie (random data)."""
    scores = torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(texts, dim=-1).t()
    correct = text_to_image[None, :] == torch.arange(len(images))[:, None]  # [N_img, N_txt]
    order = scores.argsort(dim=1, descending=True)
    image_ranks = torch.stack([torch.nonzero(correct[i, order[i]])[0, 0] for i in range(len(images))])
    order = scores.t().argsort(dim=1, descending=True)
    text_ranks = torch.stack([torch.nonzero(order[j] == text_to_image[j])[0, 0] for j in range(len(texts))])
    metrics = {f"image_to_text_R@{k}": 100.0 * (image_ranks < k).double().mean().item() for k in ks}
    metrics.update({f"text_to_image_R@{k}": 100.0 * (text_ranks < k).double().mean().item() for k in ks})
    return metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_implementation_and_is_chunk_invariant(seed):
    images, texts, text_to_image = random_retrieval(seed)
    ks = (1, 3, 5, 10)
    expected = naive_recall(images, texts, text_to_image, ks)
    assert 0 < expected["image_to_text_R@1"] < 100 and 0 < expected["text_to_image_R@1"] < 100
    for chunk_size in (1, 2, 7, 1024):
        metrics = retrieval_recall(images, texts, text_to_image, ks=ks, chunk_size=chunk_size)
        assert metrics == pytest.approx(expected), chunk_size


def test_progress_bar(capsys):
    retrieval_recall(IMAGES, TEXTS, TEXT_TO_IMAGE)  # one chunk per direction: no bar
    retrieval_recall(IMAGES, TEXTS, TEXT_TO_IMAGE, chunk_size=1, show_progress_bar=False)
    assert capsys.readouterr().err == ""
    retrieval_recall(IMAGES, TEXTS, TEXT_TO_IMAGE, chunk_size=2)  # several chunks: shown by default
    err = capsys.readouterr().err
    assert "Image->text retrieval" in err and "Text->image retrieval" in err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text_embeds": torch.ones(6, 3)}, "dimension 3"),
        ({"text_to_image": [0, 0, 1, 1, 2, 3]}, "positions [5] (1 in total) hold [3]"),
        ({"text_to_image": [0, 0, 1, 1, 2, -1]}, "image indices in [0, 3)"),
        ({"text_to_image": [0, 0, 0, 1, 0, 1]}, "images [2] (1 in total) have no caption"),
        ({"text_to_image": [0, 1, 2]}, "length 6"),
        ({"text_to_image": [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]}, "integer indices"),
        ({"image_embeds": torch.empty(0, 2)}, "image_embeds is empty"),
        ({"text_embeds": torch.empty(0, 2), "text_to_image": []}, "text_embeds is empty"),
        ({"image_embeds": torch.ones(3)}, "2-D"),
        ({"image_embeds": torch.tensor([[1.0, 0.0], [float("nan"), 0.0], [0.0, 1.0]])}, "NaN"),
        ({"ks": (1, 0)}, "positive integers"),
        ({"ks": ()}, "positive integers"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_retrieval_validation(kwargs, message):
    arguments = {"image_embeds": IMAGES, "text_embeds": TEXTS, "text_to_image": TEXT_TO_IMAGE, **kwargs}
    with pytest.raises(ValueError) as error:
        retrieval_recall(**arguments)
    assert message in str(error.value)


# Classes at 0, 90 and 180 degrees. Images (angle, label): (10, 0), (80, 0), (175, 2), (-90, 1), (0, 0).
#   image 0: class 0 is closest                       -> rank 0
#   image 1: class 1 (10 away) beats class 0 (80)     -> rank 1
#   image 2: class 2 (5 away) is closest              -> rank 0
#   image 3: class 1 is 180 away, classes 0, 2 at 90  -> rank 2
#   image 4: class 0 exactly                          -> rank 0
# top1 = 3/5, top2 = 4/5; per class recall: class 0 2/3, class 1 0/1, class 2 1/1 -> mean 5/9.
def test_zero_shot_hand_case():
    classifier = at_angles(0, 90, 180)
    images, labels = at_angles(10, 80, 175, -90, 0), [0, 0, 2, 1, 0]
    metrics = zero_shot_accuracy(images, labels, classifier, ks=(1, 2, 5))
    assert set(metrics) == {"zeroshot_top1", "zeroshot_top2", "mean_per_class_recall"}  # k=5 > 3 classes skipped
    assert metrics["zeroshot_top1"] == pytest.approx(60.0)
    assert metrics["zeroshot_top2"] == pytest.approx(80.0)
    assert metrics["mean_per_class_recall"] == pytest.approx(100 * 5 / 9)
    for chunk_size in (1, 2):
        assert zero_shot_accuracy(images, labels, classifier, ks=(1, 2), chunk_size=chunk_size) == metrics


def test_zero_shot_tie_and_absent_class():
    # Image (1, 1) is equally close to classes e_x and e_y -> half a hit for either label. Image e_y labelled 0
    # has class 1 strictly above and class 2 (-e_x) tied with its class 0 -> top-1 miss, top-2 half a hit.
    # Class 2 has no image and is left out of the per-class mean.
    classifier = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    images = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    metrics = zero_shot_accuracy(images, [0, 1, 0], classifier, ks=(1, 2, 5))
    assert metrics == pytest.approx({"zeroshot_top1": 100 * 1 / 3, "zeroshot_top2": 100 * 2.5 / 3,
                                     "mean_per_class_recall": 100 * ((0.5 + 0) / 2 + 0.5) / 2}, abs=1e-9)


def test_zero_shot_validation():
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        zero_shot_accuracy(IMAGES, [0, 1, 3], at_angles(0, 90, 180))
    with pytest.raises(ValueError, match="dimension 3"):
        zero_shot_accuracy(IMAGES, [0, 1, 2], torch.ones(3, 3))


def test_build_classifier():
    table = {
        "a cat.": [2.0, 0.0, 0.0], "the cat!": [0.0, 0.5, 0.0],  # normalised: e_x, e_y -> mean direction (1,1,0)
        "a dog.": [0.0, 0.0, 3.0], "the dog!": [0.0, 0.0, 1.0],  # both e_z
    }
    calls = []

    def encode(texts):
        calls.append(texts)
        return torch.tensor([table[text] for text in texts])

    classifier = build_classifier(["cat", "dog"], ["a {}.", "the {}!"], encode)
    assert calls == [["a cat.", "the cat!"], ["a dog.", "the dog!"]]
    half = 1 / math.sqrt(2)
    torch.testing.assert_close(classifier, torch.tensor([[half, half, 0.0], [0.0, 0.0, 1.0]]))
    assert all(isinstance(t, str) and "{}" in t for t in DEFAULT_TEMPLATES) and len(DEFAULT_TEMPLATES) >= 6


def test_build_classifier_validation():
    def encode(texts):
        return torch.ones(len(texts), 4)

    with pytest.raises(ValueError, match="placeholder"):
        build_classifier(["cat"], ["a photo of a cat"], encode)
    with pytest.raises(ValueError, match="class_names is empty"):
        build_classifier([], DEFAULT_TEMPLATES, encode)
    with pytest.raises(ValueError, match="one embedding per text"):
        build_classifier(["cat"], DEFAULT_TEMPLATES, lambda texts: torch.ones(1, 4))


def test_caption_retrieval_hand_cases():
    keys = torch.eye(4)
    assert caption_retrieval_accuracy(torch.eye(4), keys) == 100.0
    # Keys shifted by one: query i's own key (row i) now holds e_{i-1}, the exact match of query i sits at i + 1.
    assert caption_retrieval_accuracy(torch.eye(4), keys.roll(1, dims=0)) == 0.0
    # a = e_x, e_y, e_z; b = e_x, (2, 1, 0) / sqrt(5), e_z.
    # a -> b: a_0 scores 1 vs 0.894 with b_0 / b_1; a_1 scores 0.447 with b_1, 0 elsewhere; a_2 exact -> 3/3.
    # b -> a: b_1 scores 0.894 with a_0 > 0.447 with a_1 -> miss; b_0, b_2 exact -> 2/3.
    a = torch.eye(3)
    b = torch.tensor([[1.0, 0.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    metrics = caption_retrieval_metrics(a, b)
    assert metrics == pytest.approx({"cra_a_to_b": 100.0, "cra_b_to_a": 100 * 2 / 3, "cra": 100 * 5 / 6})
    assert caption_retrieval_metrics(a, b, chunk_size=1) == metrics


def test_caption_retrieval_tie_and_validation():
    # Query e_x is equally close to its own key (1, 1) and to key 1 (1, -1): tie -> half a hit. Query -e_y is
    # closest to its own key (1, -1) -> hit.
    queries = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    keys = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    assert caption_retrieval_accuracy(queries, keys) == pytest.approx(75.0, abs=1e-9)
    with pytest.raises(ValueError, match="3 rows but key_embeds has 2"):
        caption_retrieval_accuracy(torch.eye(3), torch.eye(3)[:2])


def test_metric_path():
    path = metric_path()
    assert os.path.isfile(os.path.join(path, "llm2clip_retrieval.py"))
    with pytest.raises(ValueError, match="llm2clip_retrieval"):
        metric_path("no_such_metric")


@pytest.mark.slow
def test_evaluate_module_offline(tmp_path):
    images, texts, text_to_image = random_retrieval(seed=5)
    captions_per_image = [1, 2, 3, 1]
    datasets = [{"predictions": images.tolist(),
                 "references": [texts[text_to_image == i].tolist() for i in range(len(images))]}]
    for kind in ("constant", "zero"):  # a collapsed encoder
        caption = collapsed(kind, 1)[0].tolist()
        datasets.append({"predictions": collapsed(kind, 4).tolist(),
                         "references": [[caption] * count for count in captions_per_image]})
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps(datasets))
    script = textwrap.dedent(f"""
        import json, evaluate
        from llm2clip_hf.evaluation import metric_path
        metric = evaluate.load(metric_path())
        assert type(metric).__name__ == "LLM2CLIPRetrieval", type(metric)
        datasets = json.load(open({str(inputs)!r}))
        print(json.dumps([metric.compute(**data, ks=[1, 5], chunk_size=4) for data in datasets]))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    random_metrics, *collapsed_metrics = json.loads(result.stdout.strip().splitlines()[-1])
    # The module received captions grouped per image, i.e. in a different order: the ranks do not depend on it.
    assert random_metrics == pytest.approx(retrieval_recall(images, texts, text_to_image, ks=(1, 5)))
    chance = {f"image_to_text_R@{k}": chance_image_to_text(captions_per_image, k) for k in (1, 5)}
    chance.update({"text_to_image_R@1": 25.0, "text_to_image_R@5": 100.0})
    for metrics in collapsed_metrics:
        assert metrics == pytest.approx(chance, abs=1e-9)
