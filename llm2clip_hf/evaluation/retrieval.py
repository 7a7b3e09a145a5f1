"""Image-text retrieval recall (Flickr30k / COCO style)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .ranking import check_embeddings, check_index, check_ks, format_indices, rank_counts, recall_at_k


def retrieval_recall(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_to_image: Sequence[int] | torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    show_progress_bar: bool | None = None,
) -> dict[str, float]:
    """Recall@k of image->text and text->image retrieval by cosine similarity, in percent.

    Image->text: an image is a hit at ``k`` when *any* of its captions is among the ``k`` best-scoring captions
    (the CLIP_benchmark convention). Text->image: a caption is a hit when its image is among the ``k`` best images.

    Tied candidates count by the expectation under random tie-breaking (see :mod:`.ranking`): a query whose
    best correct candidate ties with wrong ones gets the probability that a random order of the tied candidates
    puts a correct one in the top ``k``. Collapsed (constant) embeddings thus score chance level, not 100, and the
    result is deterministic, independent of the candidates' order and of ``chunk_size``. ``k`` larger than the
    number of candidates is allowed (recall 100).

    Args:
        image_embeds: ``[N_img, D]`` image embeddings.
        text_embeds: ``[N_txt, D]`` caption embeddings.
        text_to_image: ``N_txt`` image indices, the image each caption describes; every image needs a caption.
        ks: the cut-offs to report.
        chunk_size: queries scored at once, so only ``chunk_size x N`` similarities exist at a time.
        show_progress_bar: tqdm bar over chunks; ``None`` shows it when a direction has at least two chunks.

    Returns:
        ``{"image_to_text_R@k": ..., "text_to_image_R@k": ...}`` for every ``k`` in ``ks``.
    """
    ks = check_ks(ks)
    image_embeds = check_embeddings("image_embeds", image_embeds)
    text_embeds = check_embeddings("text_embeds", text_embeds, dim=image_embeds.shape[1])
    num_images, num_texts = image_embeds.shape[0], text_embeds.shape[0]
    text_to_image = check_index("text_to_image", text_to_image, num_texts, num_images, "image")
    uncaptioned = torch.nonzero(torch.bincount(text_to_image, minlength=num_images) == 0).flatten().tolist()
    if uncaptioned:
        raise ValueError(
            f"images {format_indices(uncaptioned)} have no caption in text_to_image, so image->text "
            "recall is undefined for them; drop those images or add their captions."
        )

    text_index = torch.arange(num_texts)
    image_counts = rank_counts(image_embeds, text_embeds, text_to_image, text_index, chunk_size,
                               show_progress_bar, desc="Image->text retrieval")
    text_counts = rank_counts(text_embeds, image_embeds, text_index, text_to_image, chunk_size,
                              show_progress_bar, desc="Text->image retrieval")
    metrics = {f"image_to_text_R@{k}": value for k, value in recall_at_k(image_counts, ks).items()}
    metrics.update({f"text_to_image_R@{k}": value for k, value in recall_at_k(text_counts, ks).items()})
    return metrics
