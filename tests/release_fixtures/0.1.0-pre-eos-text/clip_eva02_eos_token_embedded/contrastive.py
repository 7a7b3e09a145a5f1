"""The image-text objectives shared by the model's ``return_loss`` and the trainer's losses: CLIP's symmetric
InfoNCE and SigLIP's pairwise sigmoid loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def local_clip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    all_image_embeds: torch.Tensor,
    all_text_embeds: torch.Tensor,
    scale: torch.Tensor,
    offset: int = 0,
) -> torch.Tensor:
    """Symmetric InfoNCE of a local batch against the candidates of all processes (open_clip's local loss).

    All embeddings are L2-normalised. Local image ``i`` matches global text ``offset + i`` and local text ``i``
    matches global image ``offset + i``; ``scale`` is ``exp(logit_scale)``. With one process, pass the local
    tensors as the global ones and ``offset=0``: this is then CLIP's loss.
    """
    labels = torch.arange(image_embeds.shape[0], device=image_embeds.device) + offset
    logits_per_image = scale * image_embeds @ all_text_embeds.t()
    logits_per_text = scale * text_embeds @ all_image_embeds.t()
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


def local_sigmoid_loss(
    image_embeds: torch.Tensor,
    all_text_embeds: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    offset: int = 0,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss of the local images against the texts of all processes.

    Embeddings are L2-normalised; ``logits = scale * images @ texts.T + bias``; the pair (local image ``i``, text
    ``offset + i``) is positive, every other pair negative; the sum of ``-logsigmoid(label * logit)`` over all pairs
    is divided by the number of local images (open_clip's ``SigLipLoss``). With equal shares the mean over processes
    equals the one-process loss on the global batch.
    """
    logits = scale * image_embeds @ all_text_embeds.t() + bias
    labels = -torch.ones_like(logits)
    rows = torch.arange(image_embeds.shape[0], device=logits.device)
    labels[rows, rows + offset] = 1.0
    return -F.logsigmoid(labels * logits).sum() / image_embeds.shape[0]
