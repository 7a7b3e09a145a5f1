"""Run the metrics on models and datasets: embed images and captions in batches, then rank in chunks.

Every row is used: a row that cannot be embedded stops the evaluation with its index, so reported numbers always
cover the whole dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers.utils import logging as hf_logging

from ..data import (
    caption_texts,
    check_cache_rows,
    check_embedding_cache,
    embedding_column,
    embeddings_as_float32,
    load_image,
    read_cache_metadata,
    require_columns,
)
from ..modeling import LLM2CLIPModel, LLM2CLIPTextModel
from ..modeling.processing_llm2clip import image_processor_for
from .caption_retrieval import caption_retrieval_metrics
from .retrieval import retrieval_recall
from .zero_shot import DEFAULT_TEMPLATES, build_classifier, zero_shot_accuracy


@torch.no_grad()
def embed_images(model: LLM2CLIPModel, images: Sequence, batch_size: int = 32,
                 show_progress_bar: bool | None = None) -> torch.Tensor:
    """Joint-space image features (float32, CPU) with the evaluation preprocessing (resize + center crop)."""
    processor = image_processor_for(model.config.vision_config)
    device, dtype = model.logit_scale.device, next(model.vision_model.parameters()).dtype
    was_training = model.training
    model.eval()
    features = []
    disable = not (show_progress_bar if show_progress_bar is not None else len(images) > batch_size)
    for start in hf_logging.tqdm(range(0, len(images), batch_size), desc="Embedding images", unit="batch",
                                 disable=disable):
        batch = []
        for row in range(start, min(start + batch_size, len(images))):
            try:
                batch.append(load_image(images[row]))
            except Exception as error:  # noqa: BLE001 - any unreadable image: name the row, keep the cause
                raise ValueError(f"Row {row}: cannot read the image ({type(error).__name__}: {error}). Fix or drop "
                                 "that row; evaluation does not skip rows.") from error
        pixels = processor(batch, return_tensors="pt")["pixel_values"].to(device, dtype)
        features.append(model.get_image_features(pixel_values=pixels).float().cpu())
    model.train(was_training)
    return torch.cat(features)


@torch.no_grad()
def embed_llm_outputs(model: LLM2CLIPModel, llm_embeddings: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Joint-space text features from LLM sentence embeddings (the adapter), float32 on CPU."""
    device = model.logit_scale.device
    was_training = model.training
    model.eval()
    out = [model.get_text_features(llm_embeddings[i:i + batch_size].to(device)).float().cpu()
           for i in range(0, len(llm_embeddings), batch_size)]
    model.train(was_training)
    return torch.cat(out)


def llm_embeddings_for(texts: list[str], model: LLM2CLIPModel, text_model: LLM2CLIPTextModel | None,
                       batch_size: int = 32, show_progress_bar: bool | None = None,
                       instruction: str | None = None) -> torch.Tensor:
    """LLM embeddings of ``texts`` from ``text_model``, else from the model's embedded text encoder; an
    ``instruction`` goes before each text, excluded from pooling (``LLM2CLIPTextModel.encode``)."""
    encoder = text_model if text_model is not None else model.text_model
    if encoder is None:
        raise ValueError(
            "This LLM2CLIPModel has no embedded text encoder and no text model was given. Pass the text model its "
            "adapter was trained on (--text-model, or text_model=...), or a dataset with cached embeddings."
        )
    return encoder.encode(texts, instruction=instruction, batch_size=batch_size,
                          show_progress_bar=show_progress_bar)


def cached_llm_embeddings(dataset: Dataset, caption_columns: Sequence[str], model: LLM2CLIPModel) -> torch.Tensor | None:
    """Cached embeddings of ``caption_columns`` in :func:`caption_texts` order, when the dataset has them, they were
    made by the model's text encoder (fingerprint check) and each row's are of its own captions
    (:func:`~llm2clip_hf.data.check_cache_rows`); ``None`` when the dataset carries no cache."""
    if read_cache_metadata(dataset) is None or any(embedding_column(c) not in dataset.column_names
                                                   for c in caption_columns):
        return None
    check_embedding_cache(dataset, caption_columns, model.config.text_model_fingerprint, model.config.text_embedding_dim)
    check_cache_rows(dataset)
    vectors = []
    columns = dataset.select_columns([embedding_column(c) for c in caption_columns]).with_format("numpy")
    for cells in zip(*[columns[embedding_column(c)] for c in caption_columns]):
        for cell in cells:
            array = embeddings_as_float32(cell)
            vectors.extend(array if array.ndim == 2 else [array])
    return torch.from_numpy(np.stack(vectors))


def evaluate_retrieval(
    model: LLM2CLIPModel,
    dataset: Dataset,
    image_column: str,
    caption_columns: Sequence[str],
    text_model: LLM2CLIPTextModel | None = None,
    batch_size: int = 32,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    show_progress_bar: bool | None = None,
    per_column: bool = False,
) -> dict[str, float]:
    """Image<->text recall@k on ``dataset`` (every caption of every caption column belongs to its row's image).

    Caption embeddings come from the dataset's cache when present (checked against the model), else from
    ``text_model`` or the embedded text encoder. Also reports the number of images and captions and the length of
    the captions (:func:`caption_length_statistics`).

    ``per_column`` (with two or more caption columns): also each column as its own text gallery (one language
    each, as in cross-lingual retrieval XM3600-style, or short vs long captions): the metrics of column ``c`` as
    ``"<c>/<metric>"`` and their mean over the columns as ``"mean/<metric>"``, beside the metrics of all columns'
    captions together; the images are embedded once.

    Example:
        ```python
        from llm2clip_hf import LLM2CLIPModel
        from llm2clip_hf.data import load_dataset_from_spec
        from llm2clip_hf.evaluation import evaluate_retrieval

        model = LLM2CLIPModel.from_pretrained("my-llm2clip")
        test = load_dataset_from_spec("my_test/")
        metrics = evaluate_retrieval(model, test, "image", ["short_caption", "long_caption"])
        print(metrics["image_to_text_R@5"], metrics["text_to_image_R@5"])
        ```
    """
    require_columns(dataset, [image_column, *caption_columns], "Retrieval evaluation")
    image_features = embed_images(model, dataset[image_column], batch_size, show_progress_bar)

    def gallery(columns: Sequence[str]) -> dict[str, float]:
        return _text_gallery_retrieval(model, dataset, columns, image_features, text_model, batch_size, ks,
                                       chunk_size, show_progress_bar)

    metrics = gallery(caption_columns)
    if not per_column or len(caption_columns) < 2:
        return metrics
    results = [gallery([column]) for column in caption_columns]
    metrics.update({f"{column}/{name}": value for column, result in zip(caption_columns, results)
                    for name, value in result.items()})
    recall_names = [name for name in results[0] if "_R@" in name]
    metrics.update({f"mean/{name}": sum(result[name] for result in results) / len(results) for name in recall_names})
    return metrics


def _text_gallery_retrieval(model: LLM2CLIPModel, dataset: Dataset, caption_columns: Sequence[str],
                            image_features: torch.Tensor, text_model: LLM2CLIPTextModel | None, batch_size: int,
                            ks: Sequence[int], chunk_size: int, show_progress_bar: bool | None) -> dict[str, float]:
    """Retrieval between the images and the captions of ``caption_columns``, with the captions' lengths."""
    texts, text_to_image = caption_texts(dataset, caption_columns)
    llm = cached_llm_embeddings(dataset, caption_columns, model)
    if llm is None:
        llm = llm_embeddings_for(texts, model, text_model, batch_size, show_progress_bar)
    text_features = embed_llm_outputs(model, llm)
    metrics = retrieval_recall(image_features, text_features, text_to_image, ks=ks, chunk_size=chunk_size,
                               show_progress_bar=show_progress_bar)
    encoder = text_model if text_model is not None else model.text_model
    tokenizer = encoder.tokenizer if encoder is not None else None
    return {**metrics, "num_images": len(image_features), "num_captions": len(texts),
            **caption_length_statistics(texts, tokenizer)}


CLIP_TEXT_TOKENS = 77
"""The context of CLIP's text encoder: captions longer than this are cut (LLM2CLIP's text side reads them whole)."""


def caption_length_statistics(texts: Sequence[str], tokenizer: Any = None) -> dict[str, float]:
    """Length distribution of the query captions: words (whitespace-separated; each word is at least one CLIP BPE
    token, so ``words_over_77`` is a lower bound on the share of captions CLIP's 77-token encoder cuts) and, with
    ``tokenizer`` (the LLM's), tokens without special tokens: median, 90th percentile and maximum."""
    words = np.array([len(text.split()) for text in texts])
    statistics = {"caption_words_median": float(np.median(words)),
                  "caption_words_p90": float(np.percentile(words, 90)), "caption_words_max": float(words.max()),
                  f"caption_words_over_{CLIP_TEXT_TOKENS}": 100.0 * float((words > CLIP_TEXT_TOKENS).mean())}
    if tokenizer is not None:
        tokens = np.array([len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]])
        statistics.update({"caption_tokens_median": float(np.median(tokens)),
                           "caption_tokens_p90": float(np.percentile(tokens, 90)),
                           "caption_tokens_max": float(tokens.max())})
    return statistics


def evaluate_zero_shot(
    model: LLM2CLIPModel,
    dataset: Dataset,
    image_column: str,
    label_column: str,
    class_names: Sequence[str] | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    text_model: LLM2CLIPTextModel | None = None,
    batch_size: int = 32,
    show_progress_bar: bool | None = None,
) -> dict[str, float]:
    """Zero-shot classification accuracy: class names x templates embedded and averaged per class.

    ``label_column`` holds class indices (a ``ClassLabel``, whose names are used by default: the folder names of an
    imagefolder of class subfolders) or class-name strings. ``class_names`` replaces a ``ClassLabel``'s names one for
    one, in its order (e.g. readable names for ImageNet's WordNet-id folders).

    Example:
        ```python
        from llm2clip_hf import LLM2CLIPModel
        from llm2clip_hf.data import load_dataset_from_spec
        from llm2clip_hf.evaluation import evaluate_zero_shot

        model = LLM2CLIPModel.from_pretrained("my-llm2clip")
        print(evaluate_zero_shot(model, load_dataset_from_spec("my_test/"), "image", "label")["zeroshot_top1"])
        ```
    """
    require_columns(dataset, [image_column, label_column], "Zero-shot evaluation")
    class_names, labels = zero_shot_labels(dataset, label_column, class_names)

    def encode(texts: list[str]) -> torch.Tensor:
        return embed_llm_outputs(model, llm_embeddings_for(texts, model, text_model, batch_size, False))

    classifier = build_classifier(class_names, templates, encode, show_progress_bar=show_progress_bar)
    image_features = embed_images(model, dataset[image_column], batch_size, show_progress_bar)
    metrics = zero_shot_accuracy(image_features, torch.tensor(labels), classifier)
    return {**metrics, "num_images": len(dataset), "num_classes": len(class_names)}


def zero_shot_labels(dataset: Dataset, label_column: str, class_names: Sequence[str] | None = None
                     ) -> tuple[list[str], list[int]]:
    """The class names and every row's class index, as :func:`evaluate_zero_shot` reads ``label_column``."""
    labels = list(dataset[label_column])
    label_names = getattr(dataset.features[label_column], "names", None)
    if class_names is None:
        class_names = label_names or sorted(set(map(str, labels)))
    elif label_names and len(class_names) != len(label_names):
        raise ValueError(
            f"{len(class_names)} class names were given for the {len(label_names)} classes of the ClassLabel column "
            f"{label_column!r} ({label_names[:5]}...); give one name per class, in the ClassLabel's order (for an "
            "imagefolder, the sorted folder names), or none to use its names.")
    class_names = list(class_names)
    if labels and isinstance(labels[0], str):
        index = {name: i for i, name in enumerate(class_names)}
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise ValueError(f"Labels {unknown[:10]} are not among the class names {class_names[:10]}...; pass "
                             "class_names covering every label.")
        labels = [index[name] for name in labels]
    return class_names, labels


def evaluate_caption_retrieval(
    text_model: LLM2CLIPTextModel,
    dataset: Dataset,
    caption_columns: Sequence[str],
    query_instruction: str | None = None,
    batch_size: int = 32,
    chunk_size: int = 1024,
    show_progress_bar: bool | None = None,
) -> dict[str, float]:
    """Caption retrieval accuracy (CRA) between two caption columns of the same rows, both directions, in percent.

    ``query_instruction`` (excluded from pooling) is put on the query side of each direction, as stage 1 trains.

    Example:
        ```python
        from llm2clip_hf import LLM2CLIPTextModel
        from llm2clip_hf.data import load_dataset_from_spec
        from llm2clip_hf.evaluation import evaluate_caption_retrieval

        text_model = LLM2CLIPTextModel.from_pretrained("my-text-encoder")
        pairs = load_dataset_from_spec("pairs.jsonl")
        print(evaluate_caption_retrieval(text_model, pairs, ["short_caption", "long_caption"]))
        ```
    """
    if len(caption_columns) != 2:
        raise ValueError(f"Caption retrieval needs exactly two caption columns, got {list(caption_columns)}.")
    require_columns(dataset, caption_columns, "Caption retrieval evaluation")
    first, second = (caption_texts(dataset, [c])[0] for c in caption_columns)
    if len(first) != len(dataset) or len(second) != len(dataset):
        raise ValueError("Caption retrieval needs one caption per row in each column (found lists of captions).")
    plain = [text_model.encode(t, batch_size=batch_size, show_progress_bar=show_progress_bar) for t in (first, second)]
    if query_instruction is None:
        metrics = caption_retrieval_metrics(plain[0], plain[1], chunk_size=chunk_size)
    else:
        queries = [text_model.encode(t, instruction=query_instruction, batch_size=batch_size,
                                     show_progress_bar=show_progress_bar) for t in (first, second)]
        forward = caption_retrieval_metrics(queries[0], plain[1], chunk_size=chunk_size)
        backward = caption_retrieval_metrics(queries[1], plain[0], chunk_size=chunk_size)
        metrics = {"cra_a_to_b": forward["cra_a_to_b"], "cra_b_to_a": backward["cra_a_to_b"]}
        metrics["cra"] = (metrics["cra_a_to_b"] + metrics["cra_b_to_a"]) / 2
    return {**metrics, "num_pairs": len(dataset)}
