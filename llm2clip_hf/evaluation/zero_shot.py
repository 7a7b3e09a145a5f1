"""Zero-shot image classification with text-embedding classifiers (the CLIP recipe)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .ranking import check_embeddings, check_index, check_ks, hit_probability, progress, rank_counts, recall_at_k

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of the {}.",
    "a blurry photo of the {}.",
)
"""Generic prompt templates; ``{}`` is replaced by the class name."""


def build_classifier(
    class_names: Sequence[str],
    templates: Sequence[str],
    encode_fn: Callable[[list[str]], torch.Tensor],
    show_progress_bar: bool | None = False,
) -> torch.Tensor:
    """Zero-shot classifier weights ``[C, D]`` (float32): per class, the L2-normalised mean of the L2-normalised
    embeddings of every template filled with the class name.

    Args:
        class_names: the ``C`` class names.
        templates: format strings with a ``{}`` placeholder for the class name, e.g. :data:`DEFAULT_TEMPLATES`.
        encode_fn: maps a list of texts to a ``[len(texts), D]`` tensor of text embeddings; called once per class.
        show_progress_bar: tqdm bar over classes; ``None`` shows it when there are at least two classes.
    """
    class_names, templates = list(class_names), list(templates)
    if not class_names:
        raise ValueError("class_names is empty; pass at least one class name.")
    if not templates:
        raise ValueError("templates is empty; pass at least one template such as 'a photo of a {}.'.")
    bad = [template for template in templates if not isinstance(template, str) or "{}" not in template]
    if bad:
        raise ValueError(f"templates {bad!r} lack the '{{}}' placeholder for the class name.")

    weights = []
    with torch.no_grad():
        for name in progress(class_names, len(class_names), show_progress_bar, "Zero-shot classifier"):
            embeds = encode_fn([template.format(name) for template in templates])
            embeds = check_embeddings(f"encode_fn output for class {name!r}", embeds,
                                      dim=weights[0].shape[0] if weights else None)
            if embeds.shape[0] != len(templates):
                raise ValueError(f"encode_fn returned {embeds.shape[0]} embeddings for {len(templates)} texts "
                                 f"of class {name!r}; it must return one embedding per text.")
            weights.append(F.normalize(F.normalize(embeds, dim=-1).mean(dim=0), dim=-1))
    return torch.stack(weights)


def zero_shot_accuracy(
    image_embeds: torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    classifier: torch.Tensor,
    ks: Sequence[int] = (1, 5),
    chunk_size: int = 1024,
    show_progress_bar: bool | None = None,
) -> dict[str, float]:
    """Top-k accuracy and mean per-class recall of zero-shot classification by cosine similarity, in percent.

    An image is correct at ``k`` when its true class is among the ``k`` best-scoring classes. Classes tied with
    the true class count by the expectation under random tie-breaking (see :mod:`.ranking`), so a collapsed
    encoder scores chance level ``k / C`` and the result is deterministic, independent of class order and
    ``chunk_size``. ``k`` larger than the number of classes is skipped. ``mean_per_class_recall`` averages the
    (expected) top-1 accuracy of each class present in ``labels``.

    Args:
        image_embeds: ``[N, D]`` image embeddings.
        labels: ``N`` class indices in ``[0, C)``.
        classifier: ``[C, D]`` class embeddings, e.g. from :func:`build_classifier`.
        ks: the cut-offs to report.
        chunk_size: images scored at once.
        show_progress_bar: tqdm bar over chunks; ``None`` shows it when there are at least two chunks.

    Returns:
        ``{"zeroshot_top1": ..., "zeroshot_top5": ..., "mean_per_class_recall": ...}`` (one ``zeroshot_top{k}``
        per kept ``k``).
    """
    ks = check_ks(ks)
    image_embeds = check_embeddings("image_embeds", image_embeds)
    classifier = check_embeddings("classifier", classifier, dim=image_embeds.shape[1])
    num_classes = classifier.shape[0]
    labels = check_index("labels", labels, image_embeds.shape[0], num_classes, "class")

    counts = rank_counts(image_embeds, classifier, torch.arange(len(labels)), labels, chunk_size,
                         show_progress_bar, desc="Zero-shot classification")
    kept = [k for k in ks if k <= num_classes]
    metrics = {f"zeroshot_top{k}": value for k, value in recall_at_k(counts, kept).items()}
    hits_per_class = torch.bincount(labels, weights=hit_probability(counts, 1), minlength=num_classes)
    images_per_class = torch.bincount(labels, minlength=num_classes)
    present = images_per_class > 0
    metrics["mean_per_class_recall"] = 100.0 * (hits_per_class[present] / images_per_class[present]).mean().item()
    return metrics
