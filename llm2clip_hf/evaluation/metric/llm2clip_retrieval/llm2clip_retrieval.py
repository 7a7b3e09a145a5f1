"""Image-text retrieval recall@k as an `evaluate` metric, a thin wrapper of llm2clip_hf.evaluation.retrieval_recall.

Load it offline with ``evaluate.load(llm2clip_hf.evaluation.metric_path())``.
"""

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np
import torch

from llm2clip_hf.evaluation import retrieval_recall
from llm2clip_hf.evaluation.ranking import format_indices

_DESCRIPTION = """\
Recall@k of image->text and text->image retrieval by cosine similarity between image and caption embeddings,
in percent. Image->text counts an image as a hit at k when any of its captions is among the k most similar
captions; text->image counts a caption as a hit when its image is among the k most similar images. Candidates
tied with a query's best correct one count by the expectation under random tie-breaking: the query gets the
probability that a random order of the tied candidates puts a correct one in the top k. Collapsed (constant)
embeddings therefore score chance level, not 100, and the result stays deterministic and independent of the
order of the candidates.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one image embedding (list of floats) per image.
    references: for each image, the embeddings of its captions (a non-empty list of lists of floats); all
        captions of all images form the text gallery.
    ks: the cut-offs to report, default (1, 5, 10).
    chunk_size: queries scored at once, default 1024.
    show_progress_bar: tqdm bar over chunks, default False.
Returns:
    image_to_text_R@k and text_to_image_R@k for every k.
Examples:
    >>> metric = evaluate.load(llm2clip_hf.evaluation.metric_path())
    >>> metric.compute(predictions=[[1.0, 0.0], [0.0, 1.0]], references=[[[1.0, 0.1]], [[0.1, 1.0]]], ks=[1])
    {'image_to_text_R@1': 100.0, 'text_to_image_R@1': 100.0}
"""

_CITATION = """\
@article{huang2024llm2clip,
  title={LLM2CLIP: Powerful Language Model Unlocks Richer Visual Representation},
  author={Huang, Weiquan and others},
  journal={arXiv preprint arXiv:2411.04997},
  year={2024}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LLM2CLIPRetrieval(evaluate.Metric):
    """Image-text retrieval recall@k from image embeddings and their caption embeddings."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.List(datasets.Value("float32")),
                "references": datasets.List(datasets.List(datasets.Value("float32"))),
            }),
        )

    def _compute(self, predictions: list[list[float]], references: list[list[list[float]]],
                 ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024, show_progress_bar: bool | None = False
                 ) -> dict[str, float]:
        uncaptioned = [image for image, image_captions in enumerate(references) if not image_captions]
        if uncaptioned:
            raise ValueError(f"references of images {format_indices(uncaptioned)} are empty; every image needs at "
                             "least one caption embedding.")
        captions = [caption for image_captions in references for caption in image_captions]
        text_to_image = [image for image, image_captions in enumerate(references) for _ in image_captions]
        image_embeds = _as_matrix("predictions", predictions)
        text_embeds = _as_matrix("references", captions)
        return retrieval_recall(image_embeds, text_embeds, text_to_image, ks=ks, chunk_size=chunk_size,
                                show_progress_bar=show_progress_bar)


def _as_matrix(name: str, rows: list[list[float]]) -> torch.Tensor:
    lengths = {len(row) for row in rows}
    if len(lengths) > 1:
        raise ValueError(f"{name} holds embeddings of different lengths {sorted(lengths)}; all must share one.")
    return torch.from_numpy(np.asarray(rows, dtype=np.float32))
