"""The objectives of LLM2CLIP as modules: stage 1's caption InfoNCE, stage 2's CLIP InfoNCE or SigLIP's sigmoid loss
(each gathers candidates from every process itself, with gradients, so the loss of a distributed run equals the loss
of one process on the global batch), and the masked next-token prediction that can precede stage 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging as hf_logging

from ..modeling import LLM2CLIPTextModel
from ..modeling.contrastive import local_clip_loss, local_sigmoid_loss
from .distributed import Gather, default_gather

logger = hf_logging.get_logger(__name__)


class _GatheringLoss(nn.Module):
    def __init__(self, world_size: int = 1, rank: int = 0, gather: Gather | None = None) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}.")
        self.world_size, self.rank = world_size, rank
        self.gather = gather if gather is not None else default_gather(world_size)


class CaptionContrastiveLoss(_GatheringLoss):
    """Stage 1: one-directional InfoNCE, query -> all gathered positives and hard negatives.

    Cosine similarities are multiplied by ``scale`` (50, i.e. temperature 0.02); query ``i`` of this process
    matches gathered positive ``offset + i``. The mean over local queries is returned, so averaging the processes'
    losses (as DDP averages their gradients) gives the loss of the global batch when every process holds the same
    number of rows (accelerate's even batches); with uneven shares each process's queries weigh 1 / its row count.

    ``center``: subtract the mean of every embedding of the global batch (queries, positives and negatives of all
    processes, gathered with gradient) before the cosines. The loss is then blind to a component all embeddings
    share, so mapping every caption to nearly one point no longer lowers it: the collapse a raw LLM falls into at
    scale 50 (docs/results.md, "Stage 1 on small LLMs") is not a way down.
    """

    def __init__(self, scale: float = 50.0, world_size: int = 1, rank: int = 0, gather: Gather | None = None,
                 center: bool = False) -> None:
        super().__init__(world_size, rank, gather)
        self.scale, self.center = scale, center

    def forward(self, query: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None = None) -> torch.Tensor:
        if self.center:
            local = torch.cat([query, positive] + ([negative] if negative is not None else []))
            mean = self.gather(local)[0].mean(dim=0, keepdim=True)
            query, positive = query - mean, positive - mean
            negative = negative - mean if negative is not None else None
        positives, offset = self.gather(F.normalize(positive, dim=-1))
        candidates = [positives]
        if negative is not None:
            candidates.append(self.gather(F.normalize(negative, dim=-1))[0])
        scores = self.scale * F.normalize(query, dim=-1) @ torch.cat(candidates).t()
        labels = torch.arange(query.shape[0], device=query.device) + offset
        return F.cross_entropy(scores, labels)


class CLIPContrastiveLoss(_GatheringLoss):
    """Stage 2: symmetric image-text InfoNCE with a learnable temperature, local batch against the global one."""

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        image_embeds = F.normalize(image_embeds, dim=-1)
        text_embeds = F.normalize(text_embeds, dim=-1)
        all_images, offset = self.gather(image_embeds)
        all_texts, _ = self.gather(text_embeds)
        return local_clip_loss(image_embeds, text_embeds, all_images, all_texts, logit_scale.exp(), offset)


class SigLIPContrastiveLoss(_GatheringLoss):
    """Stage 2 with SigLIP's pairwise sigmoid loss (Zhai et al., 2023) and a learnable ``logit_bias``.

    ``logits = exp(logit_scale) * images @ texts.T + logit_bias`` on L2-normalised embeddings, with this process's
    images against the texts of every process (gathered with gradient); the pair (local image ``i``, gathered text
    ``offset + i``) is positive, every other pair negative. Returns ``-sum(logsigmoid(label * logit))`` divided by the
    number of local images, as open_clip's ``SigLipLoss`` (whose neighbour exchange visits the same image-text
    pairs): each pair of the global batch is scored by exactly one process, so with equal shares the mean of the
    processes' losses (as DDP averages their gradients) is the one-process loss on the global batch.
    """

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None) -> torch.Tensor:
        if logit_bias is None:
            raise ValueError("The sigmoid (SigLIP) loss needs a logit_bias; build the model with "
                             "logit_bias_init_value=-10.0.")
        image_embeds = F.normalize(image_embeds, dim=-1)
        all_texts, offset = self.gather(F.normalize(text_embeds, dim=-1))
        return local_sigmoid_loss(image_embeds, all_texts, logit_scale.exp(), logit_bias, offset)


class MaskedNextTokenLoss(nn.Module):
    """llm2vec's MNTP objective: the label of a masked token ``i`` is predicted from the output at ``i - 1``
    through the LLM's next-token head, cross-entropy averaged over the masked tokens (labels -100 elsewhere), as a
    causal-LM loss on the same labels. Only masked positions go through the head (a vocabulary of 128k makes
    full logits the largest tensor of the step)."""

    def __init__(self, lm_head: nn.Module) -> None:
        super().__init__()
        self.lm_head = lm_head

    def forward(self, hidden_states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = labels[:, 1:]
        chosen = targets != -100
        if not chosen.any():  # no token masked in this batch: a zero that keeps the graph
            return hidden_states.sum() * 0.0
        logits = self.lm_head(hidden_states[:, :-1][chosen])
        return F.cross_entropy(logits.float(), targets[chosen])


def output_head(text_model: LLM2CLIPTextModel, lm_head: nn.Module | None = None) -> nn.Module:
    """The LLM's next-token head for MNTP: ``lm_head`` when given, else the input embeddings for an LLM that ties
    them to its output layer (SmolLM2, Llama-3.2-1B, Qwen2.5-0.5B, ...)."""
    if lm_head is not None:
        return lm_head
    llm_config = text_model.config.llm_config
    if not getattr(llm_config, "tie_word_embeddings", False):
        raise ValueError(
            f"stage='mntp' predicts tokens with the LLM's output layer, and {text_model.name_or_path or 'this LLM'} "
            "does not tie it to its input embeddings, so an LLM2CLIPTextModel does not hold it. Pass it: "
            "LLM2CLIPTrainer(..., lm_head=llm2clip_hf.load_lm_head(name_or_path)) (the CLI does this itself)."
        )
    embeddings = text_model.get_input_embeddings()
    head = nn.Linear(embeddings.embedding_dim, embeddings.num_embeddings, bias=False,
                     device=embeddings.weight.device, dtype=embeddings.weight.dtype)
    head.weight = embeddings.weight
    return head


def check_loss_processes(loss: nn.Module, world_size: int, rank: int, contrastive: bool = True) -> None:
    """A contrastive loss must gather candidates from every process: refuse one built for another number of
    processes (a loss made with the defaults on 8 processes would use each process's local negatives only)."""
    built_for = getattr(loss, "world_size", None)
    if built_for is None:
        if world_size > 1 and contrastive:
            logger.warning(f"The given loss {type(loss).__name__} has no world_size attribute, so it cannot be "
                           f"checked that it gathers candidates from all {world_size} processes.")
        return
    if built_for != world_size or getattr(loss, "rank", rank) != rank:
        raise ValueError(
            f"The given loss {type(loss).__name__} was built for world_size={built_for}, rank="
            f"{getattr(loss, 'rank', None)}, but this run has {world_size} processes (this one is rank {rank}): its "
            "negatives would not be the global batch's. Build it with world_size=args.world_size, "
            "rank=args.process_index."
        )
