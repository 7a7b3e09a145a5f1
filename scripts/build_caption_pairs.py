#!/usr/bin/env python
"""Build real short/long caption-pair sets for stage-1 experiments from Debian packages, as ``datasets`` folders.

Two kinds, different from the emoji captions the demo uses (short name vs templated sentence):

* ``wordnet``: a WordNet noun lemma and its definition (``"tractor"`` / ``"a truck that has a cab but no body ..."``);
  source ``/usr/share/wordnet/data.noun`` (Debian ``wordnet-base``, WordNet 3.0 license).
* ``debian``: a package's one-line synopsis and its long description (several sentences, often over 77 CLIP
  tokens); source the ``Translation-en`` index of the Debian archive (``apt-get update -o Acquire::Languages=en``
  fetches it into ``/var/lib/apt/lists``). Packages with identical synopsis or description are dropped (source
  packages split into several binaries repeat them), so no caption appears twice.

Each output folder is a ``DatasetDict`` (``train``, ``test``) with ``short_caption`` and ``long_caption`` columns,
rows shuffled with a fixed seed, so reruns on the same source files are identical.
"""

from __future__ import annotations

import argparse
import glob
import random
import re
import subprocess
from pathlib import Path

from datasets import Dataset, DatasetDict

WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")
TRANSLATIONS = "/var/lib/apt/lists/*_debian_dists_*_main_i18n_Translation-en.lz4"


def wordnet_pairs(path: Path = WORDNET_NOUNS) -> list[tuple[str, str]]:
    """(lemma, definition) for every noun synset's first lemma; examples after the gloss's ';' dropped."""
    pairs, seen = [], set()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue  # license header
        fields, gloss = line.split("|", 1)
        parts = fields.split()
        lemma = parts[4].replace("_", " ")
        lemma = re.sub(r"\(\w+\)$", "", lemma).strip()
        definition = gloss.split(";")[0].strip().strip('"').strip()
        if len(definition.split()) < 3 or lemma.lower() in seen:
            continue
        seen.add(lemma.lower())
        pairs.append((lemma, definition[0].upper() + definition[1:] + "."))
    return pairs


def debian_pairs(pattern: str = TRANSLATIONS) -> list[tuple[str, str]]:
    """(synopsis, long description) of Debian packages; paragraph marks (' .') become blank lines joined by spaces."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"No Debian Translation-en index matches {pattern}; run "
                                "'apt-get update -o Acquire::Languages=en' first.")
    text = "".join(subprocess.run(["lz4cat", f], check=True, capture_output=True, text=True).stdout for f in files)
    pairs, seen_short, seen_long = [], set(), set()
    for record in text.split("\n\n"):
        lines = record.splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith("Description-en: ")), None)
        if start is None:
            continue
        synopsis = lines[start][len("Description-en: "):].strip()
        body = " ".join(line.strip() for line in lines[start + 1:] if line.startswith(" ") and line.strip() != ".")
        body = re.sub(r"\s+", " ", body).strip()
        if len(body.split()) < 12 or synopsis.lower() in seen_short or body in seen_long:
            continue
        seen_short.add(synopsis.lower())
        seen_long.add(body)
        pairs.append((synopsis, body))
    return pairs


SOURCES = {"wordnet": wordnet_pairs, "debian": debian_pairs}


def build(kind: str, output: Path, train_rows: int, test_rows: int, seed: int = 0) -> DatasetDict:
    pairs = SOURCES[kind]()
    random.Random(seed).shuffle(pairs)
    if len(pairs) < train_rows + test_rows:
        raise ValueError(f"{kind} has {len(pairs)} pairs, fewer than {train_rows} + {test_rows} requested.")
    split = {"test": pairs[:test_rows], "train": pairs[test_rows:test_rows + train_rows]}
    data = DatasetDict({name: Dataset.from_dict({"short_caption": [s for s, _ in rows],
                                                 "long_caption": [l for _, l in rows]})
                        for name, rows in split.items()})
    data.save_to_disk(str(output))
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=sorted(SOURCES))
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--train-rows", type=int, default=20000)
    parser.add_argument("--test-rows", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = build(args.kind, args.output, args.train_rows, args.test_rows, args.seed)
    print(data)
    print(data["train"][0])


if __name__ == "__main__":
    main()
