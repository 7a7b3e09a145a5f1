"""Any llm2clip-hf model as an MTEB (MIEB) encoder: ``mteb.evaluate(mteb_encoder(model), tasks)``.

Images and texts are embedded by the functions the package's own evaluation uses (:func:`embed_images`,
:func:`llm_embeddings_for` + :func:`embed_llm_outputs`, ``LLM2CLIPTextModel.encode``), so MTEB scores the same
embeddings that ``llm2clip-hf evaluate`` ranks. mteb (2.x) is imported only when an encoder is built.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.utils import logging as hf_logging

from ..modeling import LLM2CLIPConfig, LLM2CLIPModel, LLM2CLIPTextModel
from .model_evaluation import embed_images, embed_llm_outputs, llm_embeddings_for

if TYPE_CHECKING:
    from mteb.models.model_meta import ModelMeta

logger = hf_logging.get_logger(__name__)

TASK_INSTRUCTION = "task"
"""``query_instruction`` / ``document_instruction`` value: the instruction MTEB gives for the task and prompt type."""
AUTO = "auto"
"""``query_instruction`` default: none for an LLM2CLIP model, :data:`TASK_INSTRUCTION` for a text encoder alone."""

MTEB_REQUIREMENT = "mteb>=2.26,<3"
LLM2CLIP_CITATION = """@article{huang2024llm2clip,
  title={LLM2CLIP: Powerful Language Model Unlocks Richer Visual Representation},
  author={Huang, Weiquan and Wu, Aoqi and Yang, Yifan and others},
  journal={arXiv preprint arXiv:2411.04997}, year={2024}
}"""
_SAMPLED_VALUES = 65536


def require_mteb() -> Any:
    """The ``mteb`` module (2.x), or an ``ImportError`` that says how to install it."""
    try:
        import mteb
    except ImportError as error:
        raise ImportError(f"MTEB evaluation needs {MTEB_REQUIREMENT}: pip install 'llm2clip-hf[mteb]'.") from error
    major = int(str(getattr(mteb, "__version__", "0")).split(".")[0] or 0)
    if major != 2:
        raise ImportError(f"llm2clip-hf's MTEB encoder targets mteb 2.x, found mteb {mteb.__version__}: "
                          f"pip install '{MTEB_REQUIREMENT}'.")
    return mteb


class LLM2CLIPMTEBEncoder:
    """An LLM2CLIP model (or a text encoder alone) behind MTEB's encoder interface (``mteb.models.AbsEncoder``).

    Build it with :func:`mteb_encoder`. ``encode`` embeds the ``"image"`` and ``"text"`` of MTEB's batches and
    returns L2-normalised float32 rows (an input with both gets the sum of the two normalised embeddings, as mteb's
    own LLM2CLIP wrapper does); MTEB then scores them by cosine similarity.
    """

    mteb_model_meta: ModelMeta

    def __init__(self, model: LLM2CLIPModel | None, text_model: LLM2CLIPTextModel | None, meta: ModelMeta,
                 query_instruction: str | None, document_instruction: str | None, batch_size: int | None,
                 show_progress_bar: bool | None) -> None:
        self.model = model
        self.text_model = text_model
        self.mteb_model_meta = meta
        self.query_instruction = query_instruction
        self.document_instruction = document_instruction
        self.batch_size = batch_size
        self.show_progress_bar = show_progress_bar

    # ------------------------------------------------------------------------------------------------ MTEB API
    def encode(self, inputs: Any, *, task_metadata: Any, hf_split: str, hf_subset: str, prompt_type: Any = None,
               **kwargs: Any) -> np.ndarray:
        """Embeddings ``[len(inputs.dataset), dim]`` of an MTEB DataLoader's texts and/or images."""
        columns = set(getattr(inputs.dataset, "column_names", None) or getattr(inputs.dataset, "features", {}))
        has_text, has_image = "text" in columns, "image" in columns
        if not (has_text or has_image):
            raise ValueError(f"MTEB gave inputs with columns {sorted(columns)}; this encoder reads 'text' and 'image'.")
        batch_size = self.batch_size or kwargs.get("batch_size") or 32
        show = kwargs.get("show_progress_bar", self.show_progress_bar)
        texts: list[str] = []
        images: list[torch.Tensor] = []
        bar = hf_logging.tqdm(inputs, desc="Embedding images" if has_image else "Reading texts", unit="batch",
                              disable=not (has_image and (show if show is not None else len(inputs) > 1)))
        for batch in bar:
            if has_text:
                texts.extend(batch["text"])
            if has_image:
                images.append(self.get_image_embeddings(batch["image"], batch_size))
        features = []
        if has_text:
            instruction = self.instruction_for(task_metadata, prompt_type)
            features.append(self.get_text_embeddings(texts, instruction, batch_size, show))
        if has_image:
            features.append(torch.cat(images) if images else torch.empty(0, self.mteb_model_meta.embed_dim))
        embeddings = sum(F.normalize(f, dim=-1) for f in features)
        return F.normalize(embeddings, dim=-1).numpy().astype(np.float32, copy=False)

    # ----------------------------------------------------------------------------------------------- embedding
    def get_image_embeddings(self, images: Sequence, batch_size: int = 32) -> torch.Tensor:
        """Joint-space image features (float32, CPU) by :func:`embed_images`: the model's own preprocessing."""
        if self.model is None:
            raise ValueError("This MTEB encoder wraps a text encoder alone, which has no image side; pass an "
                             "LLM2CLIP model (mteb_encoder(clip_model, text_model=...)) for image tasks.")
        return embed_images(self.model, images, batch_size, show_progress_bar=False)

    def get_text_embeddings(self, texts: list[str], instruction: str | None = None, batch_size: int = 32,
                            show_progress_bar: bool | None = None) -> torch.Tensor:
        """Text features (float32, CPU): the LLM's sentence embeddings (with ``instruction``, excluded from pooling),
        then, for an LLM2CLIP model, its adapter into the joint space, by the package's evaluation functions."""
        if not texts:
            return torch.empty(0, self.mteb_model_meta.embed_dim)
        if self.model is None:
            return self.text_model.encode(texts, instruction=instruction, batch_size=batch_size,
                                          show_progress_bar=show_progress_bar)
        llm = llm_embeddings_for(texts, self.model, self.text_model, batch_size, show_progress_bar, instruction)
        return embed_llm_outputs(self.model, llm)

    def instruction_for(self, task_metadata: Any, prompt_type: Any) -> str | None:
        """The instruction for this prompt type: documents take ``document_instruction``, queries and prompt-less
        inputs (STS, classification, clustering) ``query_instruction``; ``"task"`` asks MTEB for the task's."""
        is_document = prompt_type is not None and getattr(prompt_type, "value", prompt_type) == "document"
        choice = self.document_instruction if is_document else self.query_instruction
        if choice == TASK_INSTRUCTION:
            choice = self.get_instruction(task_metadata, prompt_type)
        return choice or None

    def __repr__(self) -> str:
        meta = self.mteb_model_meta
        return (f"{type(self).__name__}(name={meta.name!r}, revision={meta.revision!r}, modalities={meta.modalities}, "
                f"embed_dim={meta.embed_dim})")


@functools.cache
def encoder_class() -> type:
    """:class:`LLM2CLIPMTEBEncoder` with mteb's ``AbsEncoder`` as a base (prompts, similarity), made on first use."""
    require_mteb()
    from mteb.models.abs_encoder import AbsEncoder

    return type("LLM2CLIPMTEBEncoder", (LLM2CLIPMTEBEncoder, AbsEncoder), {"__module__": __name__})


def mteb_encoder(
    model: LLM2CLIPModel | LLM2CLIPTextModel | str | os.PathLike,
    text_model: LLM2CLIPTextModel | str | os.PathLike | None = None,
    *,
    name: str | None = None,
    revision: str | None = None,
    languages: Sequence[str] | None = None,
    query_instruction: str | None = AUTO,
    document_instruction: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    batch_size: int | None = None,
    show_progress_bar: bool | None = None,
    **load_kwargs: Any,
) -> LLM2CLIPMTEBEncoder:
    """An object ``mteb.evaluate(encoder, tasks)`` (mteb 2.x) accepts, for any model this package saves or loads.

    Args:
        model: an :class:`LLM2CLIPModel` (trained by ``train --stage clip``, converted by ``convert`` or assembled)
            or an :class:`LLM2CLIPTextModel` alone (MTEB's text tasks), as objects or as a folder / Hub id.
        text_model: the text encoder for an LLM2CLIP model without an embedded one (object, folder or Hub id, as
            ``evaluate --text-model`` takes it); it replaces an embedded one when given.
        name, revision: MTEB's model name and revision (its results path and cache key). Default: the Hub id, or
            ``local/<folder name>`` (``local/unsaved`` for a model never saved), and :func:`weights_revision` of the
            weights in memory and the instructions, so that MTEB's result cache never answers for other weights.
        languages: ISO 639-3 + script codes (``"eng-Latn"``); default: the model card's ``language``.
        query_instruction, document_instruction: instruction put before query / document texts (excluded from
            pooling, as ``LLM2CLIPTextModel.encode`` does); ``"task"`` takes MTEB's instruction for the task and
            prompt type, ``None`` none. Inputs without a prompt type (STS, classification) take the query one.
            ``query_instruction="auto"``: ``None`` for an LLM2CLIP model (its adapter was trained on plain
            captions, and ``evaluate`` embeds them so), ``"task"`` for a text encoder alone (as llm2vec evaluates).
        device, dtype: where and in which dtype to run. A folder / Hub id is loaded as ``from_pretrained(...,
            dtype=dtype)`` loads it (as ``evaluate --dtype`` does), a model object is cast with ``.to(dtype)``
            (every floating tensor); default: as saved / as given.
        batch_size: texts / images per forward pass; default: MTEB's ``encode_kwargs["batch_size"]`` (32).
        show_progress_bar: default: MTEB's ``encode_kwargs["show_progress_bar"]``, else when there are 2+ batches.
        load_kwargs: more ``from_pretrained`` arguments (``attn_implementation``, ``revision`` of a Hub id, ...).

    Example:
        ```python
        from llm2clip_hf.evaluation import mteb_encoder

        encoder = mteb_encoder("my-llm2clip")  # then mteb.evaluate(encoder, tasks)
        print(encoder.mteb_model_meta.modalities)
        ```
    """
    encoder_cls = encoder_class()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    given = {id(m) for m in (model, text_model) if isinstance(m, torch.nn.Module)}  # cast these; load the others
    model = _load(model, dtype, load_kwargs, clip=None)
    if text_model is not None:
        text_model = _load(text_model, dtype, load_kwargs, clip=False)
    if isinstance(model, LLM2CLIPTextModel):
        if text_model is not None:
            raise ValueError("mteb_encoder got a text encoder as `model` and another as `text_model`; pass the "
                             "LLM2CLIP model as `model`, or the text encoder alone as `model`.")
        clip, text_model = None, model
    else:
        clip = model
    if query_instruction == AUTO:
        query_instruction = TASK_INSTRUCTION if clip is None else None
    for module in (clip, text_model):
        if module is not None and (device is not None or (dtype is not None and id(module) in given)):
            module.to(device=device, dtype=dtype if id(module) in given else None)
    if clip is not None and clip.text_model is None and text_model is None:
        logger.warning("This LLM2CLIP model has no embedded text encoder and no text_model was given: the encoder "
                       "has the image side only (MTEB refuses text tasks). Pass text_model=<the text encoder its "
                       f"adapter was trained on> ({clip.config.text_model_name_or_path or 'not recorded'}).")
    meta = model_meta(clip, text_model, name=name, revision=revision, languages=languages,
                      instructions=(query_instruction, document_instruction))
    return encoder_cls(clip, text_model, meta, query_instruction, document_instruction, batch_size,
                       show_progress_bar)


def _load(value: Any, dtype: torch.dtype | None, load_kwargs: dict[str, Any],
          clip: bool | None) -> LLM2CLIPModel | LLM2CLIPTextModel:
    """A model object as given, or loaded from a folder / Hub id as ``evaluate`` loads it (``clip=None``: either
    kind, by its config)."""
    if isinstance(value, (LLM2CLIPModel, LLM2CLIPTextModel)):
        if clip is False and isinstance(value, LLM2CLIPModel):
            raise ValueError("text_model is an LLM2CLIP model; pass the LLM2CLIP model as `model` and its text "
                             "encoder (LLM2CLIPTextModel, folder or Hub id) as `text_model`.")
        return value
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"mteb_encoder takes an LLM2CLIPModel, an LLM2CLIPTextModel, or a folder / Hub id of one, "
                        f"got {type(value).__name__}.")
    from transformers import AutoConfig

    from ..conversion.model_loading import _missing_model_error, load_clip_model, load_text_model

    kwargs = dict(load_kwargs)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if clip is None:
        hub = {k: v for k, v in kwargs.items() if k in ("revision", "token", "cache_dir")}
        try:
            config = AutoConfig.from_pretrained(str(value), **hub)
        except (OSError, ValueError) as error:
            raise _missing_model_error(str(value), "LLM2CLIP model or text encoder", error) from error
        clip = isinstance(config, LLM2CLIPConfig)
    return load_clip_model(str(value), **kwargs) if clip else load_text_model(str(value), **kwargs)


# ---------------------------------------------------------------------------------------------------- metadata
def model_meta(model: LLM2CLIPModel | None, text_model: LLM2CLIPTextModel | None, *, name: str | None = None,
               revision: str | None = None, languages: Sequence[str] | None = None,
               instructions: tuple[str | None, str | None] = (None, None)) -> ModelMeta:
    """MTEB's ``ModelMeta`` of an LLM2CLIP model (or of a text encoder alone) from its config and model card;
    ``instructions`` (query, document) enter the default revision, since they change the embeddings."""
    require_mteb()
    from mteb.models.model_meta import ModelMeta, ScoringFunction

    main = model if model is not None else text_model
    source = str(getattr(main, "name_or_path", "") or "")
    card = _card_metadata(source)
    unique = [model] if model is not None else []  # each module once (an embedded text encoder is in model)
    if text_model is not None and (model is None or model.text_model is not text_model):
        unique.append(text_model)
    parameters = sum(p.numel() for m in unique for p in m.parameters())
    memory = sum(p.numel() * p.element_size() for m in unique for p in m.parameters())
    encoder = text_model if text_model is not None else (model.text_model if model is not None else None)
    modalities = (["image"] if model is not None else []) + (["text"] if encoder is not None else [])
    base = card.get("base_model")
    settings = json.dumps({"query_instruction": instructions[0], "document_instruction": instructions[1]})
    return ModelMeta(
        loader=None,
        name=name or _model_name(source),
        revision=revision or weights_revision(*unique, settings=settings),
        release_date=None,
        languages=list(languages) if languages is not None else _languages(card.get("language")),
        n_parameters=parameters,
        memory_usage_mb=round(memory / 2**20, 1),
        max_tokens=encoder.config.max_seq_length if encoder is not None else None,
        embed_dim=model.config.projection_dim if model is not None else text_model.config.hidden_size,
        license=card.get("license"),
        open_weights=None,
        public_training_code="https://github.com/microsoft/LLM2CLIP",
        public_training_data=None,
        framework=["PyTorch", "Transformers"],
        reference=f"https://huggingface.co/{source}" if _is_hub_id(source) else None,
        similarity_fn_name=ScoringFunction.COSINE,
        use_instructions=any(instructions),
        training_datasets=None,
        adapted_from=(base[0] if isinstance(base, list) and base else base) or None,
        modalities=modalities,
        citation=LLM2CLIP_CITATION,
    )


def _is_hub_id(source: str) -> bool:
    return bool(source) and not os.path.exists(source) and source.count("/") == 1 and not source.startswith(("/", "."))


def _model_name(source: str) -> str:
    if _is_hub_id(source):
        return source
    return f"local/{Path(source).name}" if source else "local/unsaved"


def weights_revision(*models: Any, settings: str = "") -> str:
    """``weights-<hash>``: a hash of the models' configs and of every weight tensor (its name, shape, dtype and up
    to 65,536 evenly spaced values), plus ``settings``. MTEB answers a (name, revision) it has results for from
    its cache, so a retrained, re-saved or in-memory-changed model must get a new revision; this costs a fraction
    of a second even for an 8B model (whole tensors are not read)."""
    digest = hashlib.blake2b(settings.encode(), digest_size=8)
    for model in models:
        digest.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
        for tensor_name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            sample = flat[::max(1, flat.numel() // _SAMPLED_VALUES)].contiguous().cpu()
            digest.update(f"{tensor_name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            digest.update(sample.view(torch.uint8).numpy().tobytes())
    return f"weights-{digest.hexdigest()}"


def _card_metadata(source: str) -> dict[str, Any]:
    """The YAML front matter of the model's README.md (a folder's, or a Hub snapshot's from the cache), or ``{}``."""
    if not source:
        return {}
    from huggingface_hub import constants, try_to_load_from_cache

    path = os.path.join(source, "README.md") if os.path.isdir(source) else None
    if path is None and _is_hub_id(source):
        cached = try_to_load_from_cache(source, "README.md") if constants.HF_HUB_OFFLINE else None
        if cached is None and not constants.HF_HUB_OFFLINE:
            try:
                from huggingface_hub import hf_hub_download

                cached = hf_hub_download(source, "README.md")
            except Exception as error:  # noqa: BLE001 - the card only fills metadata; its absence is not an error
                logger.info(f"No model card for {source} ({type(error).__name__}); MTEB metadata left empty.")
        path = cached if isinstance(cached, str) else None
    if path is None or not os.path.isfile(path):
        return {}
    from huggingface_hub import metadata_load

    return metadata_load(path) or {}


def _languages(card_language: Any) -> list[str] | None:
    """A card's language codes (``en``) as MTEB's ``eng-Latn``; ``None`` when absent or unknown."""
    if not card_language:
        return None
    try:
        from mteb.languages.iso_mappings import _hf_langs_to_iso_lang_scripts
    except ImportError:
        return None
    return _hf_langs_to_iso_lang_scripts(card_language)
