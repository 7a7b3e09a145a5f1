"""One LLM2CLIP model from parts made apart: a text encoder embedded into a model that reads LLM embeddings only
(:func:`attach_text_model`; the official checkpoints publish the two parts separately), a new text adapter for an
LLM of another width (:func:`replace_text_adapter`), or a new adapter's input normalisation
(:func:`set_adapter_input_normalization`)."""

from __future__ import annotations

import logging

from ..modeling import LLM2CLIPModel, LLM2CLIPTextConfig, LLM2CLIPTextModel, TextAdapter

logger = logging.getLogger(__name__)


def adapter_width_error(adapter_width: int, llm_width: int, llm_name: str | None, model_name: str | None) -> str:
    """The error for an adapter whose input width is not the LLM's hidden size, naming both."""
    llm = f"the text model {llm_name!r}" if llm_name else "the text model"
    model = f" of {model_name!r}" if model_name else ""
    return (
        f"The text adapter{model} takes {adapter_width}-d LLM embeddings, but {llm} produces {llm_width}-d ones "
        f"(its hidden size). The adapter only works with the LLM it was trained on (for example, the official "
        "LLM2CLIP adapters for Llama-3-8B take 4096-d embeddings, those for Llama-3.2-1B 2048-d): pass that LLM, or "
        "train a new adapter for this one (`llm2clip-hf train --stage clip --vision-model ...`)."
    )


def attach_text_model(model: LLM2CLIPModel, text_model: LLM2CLIPTextModel) -> LLM2CLIPModel:
    """Embed ``text_model`` into ``model`` (in place; ``model`` is returned): ``config.text_config`` is set and the
    encoder's weights and tokenizer are copied, so the model reads raw text, ``save_pretrained`` writes an
    ``LLM2CLIPProcessor`` and ``pipeline("zero-shot-image-classification", model=DIR, trust_remote_code=True)``
    takes plain labels. An encoder already embedded is replaced.

    The adapter's input width must equal the LLM's hidden size (``ValueError`` naming both otherwise). When the
    model records the fingerprint of the text model its adapter was trained with and ``text_model`` differs, a
    warning says so (the adapter expects that model's embeddings).

    Example:
        ```python
        from llm2clip_hf import LLM2CLIPTextModel, attach_text_model
        from llm2clip_hf.conversion import convert_checkpoint

        image_side = convert_checkpoint("microsoft/LLM2CLIP-Openai-L-14-336")
        text_model = LLM2CLIPTextModel.from_llm("microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned")
        attach_text_model(image_side, text_model).save_pretrained("llm2clip-openai-l14-336")
        ```
    """
    if not isinstance(model, LLM2CLIPModel):
        raise TypeError(f"attach_text_model takes an LLM2CLIPModel, got {type(model).__name__}.")
    if not isinstance(text_model, LLM2CLIPTextModel):
        raise TypeError(f"attach_text_model takes an LLM2CLIPTextModel as text model, got {type(text_model).__name__}"
                        "; wrap a plain LLM with LLM2CLIPTextModel.from_llm(...).")
    llm_width = text_model.config.hidden_size
    if model.config.text_embedding_dim != llm_width:
        raise ValueError(adapter_width_error(model.config.text_embedding_dim, llm_width, text_model.name_or_path,
                                             model.name_or_path or None))
    recorded = model.config.text_model_fingerprint
    if recorded:
        from .fingerprint import text_model_fingerprint

        if text_model_fingerprint(text_model) != recorded:
            logger.warning(
                "The adapter of this model was trained on the embeddings of another text model (fingerprint %s, "
                "%s) than %s: its text features will not match its image features unless the two compute the same "
                "embeddings.", recorded, model.config.text_model_name_or_path, text_model.name_or_path)
    if model.text_model is not None:
        logger.info("Replacing the embedded text encoder %s by %s.", model.config.text_model_name_or_path,
                    text_model.name_or_path)
    text_config = LLM2CLIPTextConfig(**{k: v for k, v in text_model.config.to_dict().items() if k != "model_type"})
    encoder = LLM2CLIPTextModel(text_config)
    encoder.load_state_dict(text_model.state_dict())
    encoder.tokenizer = text_model.tokenizer
    reference = model.logit_scale
    model.text_model = encoder.to(reference.device)
    model.config.text_config = text_config
    model.config.text_model_name_or_path = text_model.name_or_path
    return model


def _configured_adapter(config, text_embedding_dim: int, input_normalization: str | None) -> TextAdapter:
    """A text adapter as ``config`` describes one, for ``text_embedding_dim``-d embeddings and this input
    normalisation."""
    return TextAdapter(text_embedding_dim, config.projection_dim, config.adapter_num_blocks, config.adapter_expansion,
                       l2_normalize=config.adapter_l2_normalize, input_normalization=input_normalization)


def _install_adapter(model: LLM2CLIPModel, adapter: TextAdapter) -> None:
    parameter = next(model.text_adapter.parameters())
    model.text_adapter = adapter.to(device=parameter.device, dtype=parameter.dtype)
    model.config.adapter_input_statistics_rows = 0


def replace_text_adapter(model: LLM2CLIPModel, text_embedding_dim: int) -> LLM2CLIPModel:
    """Give ``model`` a new, randomly initialised text adapter for ``text_embedding_dim``-d LLM embeddings (in
    place). The recorded text-model fingerprint is cleared, and an embedded text encoder of another width dropped."""
    config = model.config
    new = _configured_adapter(config, text_embedding_dim, config.adapter_input_normalization)
    new.apply(model._init_weights)
    _install_adapter(model, new)
    config.text_embedding_dim = text_embedding_dim
    config.text_model_fingerprint = None
    if model.text_model is not None and model.text_model.config.hidden_size != text_embedding_dim:
        model.text_model = None
        config.text_config = None
    return model


def set_adapter_input_normalization(model: LLM2CLIPModel, input_normalization: str | None) -> LLM2CLIPModel:
    """Give the text adapter of ``model`` this input normalisation (``None``, ``"center"`` or ``"standardize"``), in
    place: its weights are kept, its statistics start unfitted (the trainer fits them on the training cache). Meant
    for a new adapter: a trained one learnt its weights on inputs normalised its own way."""
    config = model.config
    new = _configured_adapter(config, config.text_embedding_dim, input_normalization)
    new.layers.load_state_dict(model.text_adapter.layers.state_dict())
    _install_adapter(model, new)
    config.adapter_input_normalization = input_normalization
    return model


__all__ = ["adapter_width_error", "attach_text_model", "replace_text_adapter", "set_adapter_input_normalization"]
