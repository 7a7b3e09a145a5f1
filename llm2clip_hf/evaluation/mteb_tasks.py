"""Local image-text data as MTEB tasks: an any-to-any retrieval task each way (i2t, t2i) and a zero-shot
classification task, built from a ``datasets`` split, for ``mteb.evaluate`` (mteb 2.x, imported on use).

The tasks hold the same rows, captions and class names that ``evaluate --task retrieval`` / ``zero-shot`` read
(:func:`~llm2clip_hf.data.caption_texts`, :func:`zero_shot_labels`), so MTEB's scores can be set beside the
package's. How the two count (docs/evaluation.md, "MTEB"): our image->text R@k counts an image as found when *any*
of its captions is in the top k, which is MTEB's ``hit_rate_at_k``; MTEB's ``recall_at_k`` is the share of the image's
captions in the top k (equal only with one caption per image). Text->image: one relevant image, so
``recall_at_k == hit_rate_at_k == R@k / 100``. Exact score ties: ours count by the expected hit under random
tie-breaking, MTEB's (pytrec_eval) rank tied documents by their id, so the two differ only on tied scores.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset
from datasets import Image as ImageFeature

from ..conversion.model_loading import hub_is_offline
from ..data import caption_texts, require_columns
from .model_evaluation import zero_shot_labels
from .mteb_encoder import require_mteb

DEFAULT_ZERO_SHOT_TEMPLATE = "a photo of a {}."
"""One prompt per class, as MTEB's zero-shot tasks take it (``"a photo of a {}."``: ImageNet's, CIFAR's, ...)."""


def image_text_retrieval_tasks(
    dataset: Dataset,
    image_column: str = "image",
    caption_columns: Sequence[str] = ("caption",),
    *,
    name: str = "LocalImageText",
    split: str = "test",
    languages: Sequence[str] = ("eng-Latn",),
    description: str | None = None,
) -> tuple[Any, Any]:
    """MTEB ``Any2AnyRetrieval`` tasks ``(<name>I2TRetrieval, <name>T2IRetrieval)`` over ``dataset``'s rows, data
    loaded: image queries against all captions (each row's captions relevant to its image), and caption queries
    against all images. Every caption of every caption column belongs to its row's image, as in
    :func:`~llm2clip_hf.evaluation.evaluate_retrieval`."""
    require_mteb()
    from mteb.abstasks.retrieval import AbsTaskRetrieval

    require_columns(dataset, [image_column, *caption_columns], "MTEB retrieval task")
    texts, owners = caption_texts(dataset, caption_columns)
    image_ids = [f"image-{row}" for row in range(len(dataset))]
    caption_ids = [f"caption-{index}" for index in range(len(texts))]
    images = _image_dataset(dataset, image_column).add_column("id", image_ids)
    captions = Dataset.from_dict({"id": caption_ids, "text": texts})
    captions_of: dict[str, dict[str, int]] = {image_id: {} for image_id in image_ids}
    for caption_id, owner in zip(caption_ids, owners):
        captions_of[image_ids[owner]][caption_id] = 1
    image_of = {caption_id: {image_ids[owner]: 1} for caption_id, owner in zip(caption_ids, owners)}
    about = description or f"{len(dataset)} images and their {len(texts)} captions (columns {list(caption_columns)})."
    tasks = []
    for category, queries, corpus, relevant in (("i2t", images, captions, captions_of),
                                                ("t2i", captions, images, image_of)):
        task_name = f"{name}{category.upper()}Retrieval"
        metadata = _metadata(task_name, dataset, split, languages, type="Any2AnyRetrieval", category=category,
                             modalities=["text", "image"], main_score="ndcg_at_10",
                             description=f"{'Image -> text' if category == 'i2t' else 'Text -> image'}: {about}")
        data = {"default": {split: {"corpus": corpus, "queries": queries, "relevant_docs": relevant,
                                    "top_ranked": None}}}
        tasks.append(_loaded_task(AbsTaskRetrieval, metadata, data))
    return tasks[0], tasks[1]


def zero_shot_task(
    dataset: Dataset,
    image_column: str = "image",
    label_column: str = "label",
    class_names: Sequence[str] | None = None,
    template: str = DEFAULT_ZERO_SHOT_TEMPLATE,
    *,
    name: str = "LocalZeroShot",
    split: str = "test",
    languages: Sequence[str] = ("eng-Latn",),
    description: str | None = None,
) -> Any:
    """An MTEB ``ZeroShotClassification`` task over ``dataset``'s images, data loaded. Labels and class names are
    read as :func:`~llm2clip_hf.evaluation.evaluate_zero_shot` reads them; each class is the one text
    ``template.format(class_name)`` (MTEB embeds one prompt per class; give ``evaluate_zero_shot`` the same single
    template to compare). MTEB's ``accuracy`` is our ``zeroshot_top1 / 100`` but for exact ties."""
    require_mteb()
    from mteb.abstasks.zeroshot_classification import AbsTaskZeroShotClassification

    require_columns(dataset, [image_column, label_column], "MTEB zero-shot task")
    if "{}" not in template:
        raise ValueError(f"template {template!r} lacks the '{{}}' placeholder for the class name.")
    class_names, labels = zero_shot_labels(dataset, label_column, class_names)
    rows = _image_dataset(dataset, image_column).add_column("label", labels)
    prompts = [template.format(class_name) for class_name in class_names]
    metadata = _metadata(name, dataset, split, languages, type="ZeroShotClassification", category="i2t",
                         modalities=["image", "text"], main_score="accuracy",
                         description=description or f"{len(dataset)} images in {len(class_names)} classes.")
    return _loaded_task(AbsTaskZeroShotClassification, metadata, {split: rows}, input_column_name="image",
                        label_column_name="label", get_candidate_labels=lambda self: list(prompts))


def _image_dataset(dataset: Dataset, image_column: str) -> Dataset:
    """The image column alone, named ``image`` and decoded as a ``datasets.Image`` (paths and bytes too)."""
    images = dataset.select_columns([image_column])
    if image_column != "image":
        images = images.rename_column(image_column, "image")
    if not isinstance(images.features["image"], ImageFeature):
        images = images.cast_column("image", ImageFeature())
    return images


def _metadata(name: str, dataset: Dataset, split: str, languages: Sequence[str], **fields: Any) -> Any:
    from mteb.abstasks.task_metadata import TaskMetadata

    return TaskMetadata(name=name, dataset={"path": f"local/{name}", "revision": dataset._fingerprint},
                        eval_splits=[split], eval_langs=list(languages), reference=None, date=None, domains=None,
                        license="not specified", annotations_creators="derived", dialect=[],
                        sample_creation="found", bibtex_citation="", **fields)


def _loaded_task(base: type, metadata: Any, data: dict[str, Any], **attributes: Any) -> Any:
    """An instance of a new ``base`` subclass named after the task, with ``data`` as its loaded dataset."""

    def load_data(self: Any, *args: Any, **kwargs: Any) -> None:
        self.dataset = data
        self.data_loaded = True

    task_class = type(metadata.name, (base,), {"metadata": metadata, "load_data": load_data, **attributes,
                                               "__module__": __name__})
    task = task_class()
    task.load_data()
    return task


REPORTED_SCORES = ("ndcg_at_10", "recall_at_1", "recall_at_5", "recall_at_10", "hit_rate_at_1", "hit_rate_at_5",
                   "hit_rate_at_10", "accuracy", "f1", "main_score")
"""The scores of each task and subset that :func:`run_mteb_tasks` returns (MTEB's result files keep them all)."""


def run_mteb_tasks(
    encoder: Any,
    task_names: Sequence[str] = (),
    *,
    local_tasks: Sequence[Any] = (),
    output_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    show_progress_bar: bool = True,
) -> dict[str, dict[str, dict[str, float]]]:
    """Run MTEB's tasks ``task_names`` (``mteb.get_tasks`` names) and ``local_tasks`` (e.g. from
    :func:`image_text_retrieval_tasks`) on ``encoder`` (:func:`mteb_encoder`); return ``{task: {subset: scores}}``
    (:data:`REPORTED_SCORES`, MTEB's fractions). ``output_dir``: MTEB writes its result files under
    ``<output_dir>/results/<model name>/<revision>/``; without it nothing is written.

    Each named task's data is loaded first, so that data missing offline is named before any model runs.
    """
    mteb = require_mteb()
    tasks = [*_named_tasks(mteb, task_names), *local_tasks]
    if not tasks:
        raise ValueError("No MTEB task to run: name some (--mteb-tasks Flickr30kI2TRetrieval ...) or give local data.")
    cache = mteb.ResultCache(cache_path=Path(output_dir)) if output_dir is not None else None
    result = mteb.evaluate(encoder, tasks, cache=cache, overwrite_strategy="always",
                           encode_kwargs={"batch_size": batch_size, "show_progress_bar": show_progress_bar},
                           show_progress_bar=show_progress_bar)
    return {task_result.task_name: {scores["hf_subset"]: {key: scores[key] for key in REPORTED_SCORES if key in scores}
                                    for split_scores in task_result.scores.values() for scores in split_scores}
            for task_result in result.task_results}


def _named_tasks(mteb: Any, names: Sequence[str]) -> list[Any]:
    """MTEB's tasks by name, their data loaded; an unknown name or data missing offline is a user error."""
    tasks = []
    for task_name in names:
        try:
            task = mteb.get_task(task_name)
        except KeyError as error:
            raise ValueError(f"MTEB has no task {task_name!r} ({error.args[0] if error.args else error}); list them "
                             "with python -c \"import mteb; print([t.metadata.name for t in mteb.get_tasks()])\".") \
                from error
        try:
            task.load_data()
        except (ConnectionError, OSError) as error:
            where = task.metadata.dataset.get("path"), task.metadata.dataset.get("revision")
            if hub_is_offline():
                raise FileNotFoundError(
                    f"MTEB task {task_name}: its data (Hub dataset {where[0]} at revision {where[1]}) is not in the "
                    "Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it. Run it once where the Hub is "
                    f"reachable (the data is cached then), or unset HF_HUB_OFFLINE. (cause: {error})") from error
            raise FileNotFoundError(f"MTEB task {task_name}: cannot load its data (Hub dataset {where[0]} at revision "
                                    f"{where[1]}): {error}. Check your network and Hub token.") from error
        tasks.append(task)
    return tasks


def run_mteb_from_cli(model: Any, text_model: Any, data: Any, columns: Any, args: Any) -> dict[str, Any]:
    """``evaluate --task mteb``: the named tasks and, with ``--dataset``, its rows as image<->text retrieval tasks
    (and zero-shot when it has ``--label-column``), MTEB's result files under ``--output-dir``/mteb."""
    from .mteb_encoder import AUTO, mteb_encoder

    encoder = mteb_encoder(model, text_model, query_instruction=args.query_instruction or AUTO,
                           batch_size=args.batch_size)
    local: list[Any] = []
    if data.dataset is not None:
        if encoder.model is None:
            raise ValueError("--dataset with --task mteb builds image<->text tasks, which need --model (an LLM2CLIP "
                             "model); a text encoder alone runs named text tasks (--mteb-tasks) only.")
        dataset = data.load(columns.image_column)
        local.extend(image_text_retrieval_tasks(dataset, columns.image_column, columns.caption_columns,
                                                split=data.split))
        if args.label_column in dataset.column_names:
            templates = args.templates or [DEFAULT_ZERO_SHOT_TEMPLATE]
            if len(templates) != 1:
                raise ValueError(f"MTEB's zero-shot task embeds one prompt per class; give one --templates, not "
                                 f"{len(templates)}.")
            local.append(zero_shot_task(dataset, columns.image_column, args.label_column, args.class_names,
                                        templates[0], split=data.split))
    output_dir = Path(args.output_dir) / "mteb" if args.output_dir is not None else None
    scores = run_mteb_tasks(encoder, args.mteb_tasks or (), local_tasks=local, output_dir=output_dir,
                            batch_size=args.batch_size)
    meta = encoder.mteb_model_meta
    return {"mteb_model": meta.name, "mteb_revision": meta.revision,
            "mteb_results": str(output_dir / "results") if output_dir is not None else None, "mteb": scores}
