#!/usr/bin/env python
"""Build the small emoji image–caption dataset shipped in ``llm2clip_hf/demo/emoji``.

Every emoji that the Unicode emoji test file lists as fully qualified (or as an emoji component), that CLDR's
English annotations name, and that the Noto Color Emoji font draws as one glyph is rendered on a white background,
downsized to a 64x64 RGB PNG (the glyph fills the central 56x56), and described by a short caption (its CLDR name)
and a long caption (a sentence built from the name, the CLDR keywords and the Unicode emoji group). The result is an
``imagefolder`` dataset: ``images/<code points>.png`` plus ``metadata.jsonl``.

Sources (Debian packages; install with ``apt-get install fonts-noto-color-emoji unicode-cldr-core unicode-data``):

* ``/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf`` — the images (SIL Open Font License 1.1);
* ``/usr/share/unicode/cldr/common/annotations/en.xml`` — names and keywords (Unicode license);
* ``/usr/share/unicode/emoji/emoji-test.txt`` — the emoji list, their order, groups and subgroups (Unicode license).

The output depends only on these files and on the Pillow / FreeType / zlib versions, so reruns are byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "llm2clip_hf" / "demo" / "emoji"
DEFAULT_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
DEFAULT_ANNOTATIONS = Path("/usr/share/unicode/cldr/common/annotations/en.xml")
DEFAULT_EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
# CLDR's human translations of the names, one caption column each (caption_fr, ...): cross-lingual retrieval.
TRANSLATED_LANGUAGES = ("fr", "de", "es", "zh")

FONT_SIZE = 109  # the only bitmap strike in Noto Color Emoji (CBDT)
VARIATION_SELECTOR_16 = "\ufe0f"
INCLUDED_STATUSES = ("fully-qualified", "component")

# Long-caption templates, picked per emoji by a hash of its code points. ``{a_name}`` is the name with an
# indefinite article where one reads naturally, ``{keywords}`` the CLDR keywords, ``{group}`` the emoji group.
TEMPLATES_WITH_KEYWORDS = (
    "An emoji of {a_name}; {keywords}.",
    "A small icon showing {a_name}, associated with {keywords}.",
    "{A_name} emoji from the {group} group, suggesting {keywords}.",
    "Picture of {a_name} drawn as a colourful emoji; related words: {keywords}.",
    "This emoji depicts {a_name} and is used for {keywords}.",
    "A cartoon-style emoji of {a_name} ({group}), evoking {keywords}.",
)
TEMPLATES_NAME_ONLY = (
    "An emoji of {a_name}.",
    "A small icon showing {a_name}, from the {group} group.",
    "This emoji depicts {a_name}.",
)


@dataclass(frozen=True)
class EmojiEntry:
    """One emoji from ``emoji-test.txt``: its fully qualified text, CLDR lookup key, group and subgroup."""

    text: str
    group: str
    subgroup: str

    @property
    def key(self) -> str:
        """The CLDR annotation key: the text without U+FE0F (CLDR strips variation selectors)."""
        return self.text.replace(VARIATION_SELECTOR_16, "")

    @property
    def stem(self) -> str:
        """File stem: lower-case hex code points of ``key`` joined by ``-``, e.g. ``1f600``."""
        return "-".join(f"{ord(char):x}" for char in self.key)


def read_emoji_test(path: Path) -> list[EmojiEntry]:
    """Parse ``emoji-test.txt`` into fully-qualified and component entries, in its (CLDR) order."""
    entries: list[EmojiEntry] = []
    group = subgroup = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            code_points, rest = line.split(";", 1)
            status = rest.split("#", 1)[0].strip()
            if status in INCLUDED_STATUSES:
                text = "".join(chr(int(cp, 16)) for cp in code_points.split())
                entries.append(EmojiEntry(text=text, group=group, subgroup=subgroup))
    return entries


def read_cldr_annotations(path: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Return CLDR short names (``type="tts"``) and keyword lists (in CLDR order), keyed by annotation ``cp``."""
    names: dict[str, str] = {}
    keywords: dict[str, list[str]] = {}
    for element in ET.parse(path).getroot().iter("annotation"):
        cp, text = element.get("cp"), (element.text or "").strip()
        if not cp or not text:
            continue
        if element.get("type") == "tts":
            names[cp] = text
        else:
            keywords[cp] = [word.strip() for word in text.split("|") if word.strip()]
    return names, keywords


def font_code_points(path: Path) -> set[int]:
    """Code points mapped by the font's ``cmap``."""
    font = TTFont(str(path), lazy=True)
    try:
        return set(font.getBestCmap())
    finally:
        font.close()


class EmojiRenderer:
    """Draw emoji with the colour font (raqm shaping, so ZWJ sequences ligate) and downsize them."""

    def __init__(self, font_path: Path, image_size: int, padding: int) -> None:
        self.font = ImageFont.truetype(str(font_path), FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)
        self.image_size = image_size
        self.padding = padding
        self.glyph_width = self._box("\U0001F600")[2]

    def _box(self, text: str) -> tuple[int, int, int, int]:
        probe = ImageDraw.Draw(Image.new("RGBA", (1, 1)))
        return probe.textbbox((0, 0), text, font=self.font, embedded_color=True)

    def render(self, text: str) -> Image.Image | None:
        """The emoji on white, ``image_size`` square RGB with a ``padding`` pixel white border.

        Returns ``None`` when the text does not shape into one glyph or draws nothing visible.
        """
        left, top, right, bottom = self._box(text)
        width, height = right - left, bottom - top
        if width > 1.25 * self.glyph_width:  # the sequence did not ligate into one glyph
            return None
        side = max(width, height)
        layer = Image.new("RGBA", (side, side), (255, 255, 255, 0))
        offset = ((side - width) // 2 - left, (side - height) // 2 - top)
        ImageDraw.Draw(layer).text(offset, text, font=self.font, embedded_color=True)
        if layer.getchannel("A").getbbox() is None:
            return None
        canvas = Image.new("RGBA", layer.size, (255, 255, 255, 255))
        canvas.alpha_composite(layer)
        inner = self.image_size - 2 * self.padding
        glyph = canvas.convert("RGB").resize((inner, inner), Image.Resampling.LANCZOS)
        image = Image.new("RGB", (self.image_size, self.image_size), (255, 255, 255))
        image.paste(glyph, (self.padding, self.padding))
        if image.convert("L").getextrema()[0] >= 250:  # (nearly) uniformly white after downsizing
            return None
        return image


def stable_fraction(stem: str, part: int = 0) -> float:
    """A number in [0, 1) fixed by the file stem: bytes ``8*part`` to ``8*part+8`` of its SHA-256.

    Part 0 decides the split, part 1 the caption template, so the two choices are independent.
    """
    digest = hashlib.sha256(stem.encode("ascii")).digest()
    return int.from_bytes(digest[8 * part:8 * part + 8], "big") / 2**64


def with_article(name: str) -> str:
    """Prefix ``a``/``an`` unless the name looks plural or is not a plain noun phrase (``keycap: 1``, ``ON! arrow``)."""
    head = re.split(r",| with | in | of | on | and ", name)[0].strip()  # "face with big eyes" -> "face"
    looks_plural = head.endswith("s") and not head.endswith(("ss", "us", "is"))
    words = name.split()
    # Gerunds read as activities ("bowling", "rolling on the floor laughing"), but "ring" and "seedling" are things.
    gerund = words[0].endswith("ing") and (
        (len(words) == 1 and len(words[0]) > 4 and not words[0].endswith("ling"))
        or (len(words) > 1 and words[1] in {"on", "away", "up", "down", "out"})
    )
    if looks_plural or gerund or ":" in name or not name[0].isalpha() or words[0].isupper():
        return name
    return ("an " if name[0].lower() in "aeiou" else "a ") + name


def long_caption(name: str, keywords: list[str], group: str, stem: str) -> str:
    """A deterministic, varied sentence from the name, keywords (minus the name itself) and group."""
    templates = TEMPLATES_WITH_KEYWORDS if keywords else TEMPLATES_NAME_ONLY
    pick = int(stable_fraction(stem, part=1) * len(templates))
    a_name = with_article(name)
    return templates[pick].format(
        a_name=a_name, A_name=a_name[0].upper() + a_name[1:], keywords=", ".join(keywords), group=group.lower()
    )


def dense_caption(name: str, keywords: list[str], group: str, subgroup: str) -> str:
    """A long caption (more than 77 words, so CLIP's 77-token text encoder cuts it) in which what tells the emoji
    apart (group, subgroup, keywords, name) comes after a description every emoji shares: a reader of the first 77
    tokens alone cannot tell the emoji apart."""
    associations = f"People associate it with {', '.join(keywords)}. " if keywords else ""
    return (
        "This is a small square picture taken from the Noto Color Emoji font, the set of colourful symbols that "
        "phones, chat programs and web pages show in place of plain characters. It is drawn in a flat cartoon "
        "style with bold outlines, bright colours and simple shading, on a plain white background, and it is meant "
        "to be recognised at a glance in the middle of a line of text, next to the words of a message. "
        f"In the Unicode list of emoji it belongs to the group {group.lower()}, in the subgroup "
        f"{subgroup.replace('-', ' ')}. {associations}Its name is {name}."
    )


def read_translated_names(annotations_path: Path, languages: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """CLDR's names of the emoji (``type="tts"``) in each language, from ``annotations/`` and ``annotationsDerived/``
    beside the English file, keyed by language, then by annotation ``cp``."""
    common = annotations_path.parent.parent
    translated: dict[str, dict[str, str]] = {}
    for language in languages:
        names: dict[str, str] = {}
        for folder in ("annotations", "annotationsDerived"):
            path = common / folder / f"{language}.xml"
            if not path.is_file():
                sys.exit(f"missing {path}: apt-get install unicode-cldr-core")
            for element in ET.parse(path).getroot().iter("annotation"):
                if element.get("type") == "tts" and (element.text or "").strip():
                    names.setdefault(element.get("cp"), element.text.strip())
        translated[language] = names
    return translated


def text_columns(key: str, name: str, keywords: list[str], group: str, subgroup: str, stem: str,
                 translated: dict[str, dict[str, str]]) -> dict[str, str]:
    """Every caption of one emoji: short (name), long (one sentence), dense (> 77 words) and one per language."""
    columns = {"short_caption": name, "long_caption": long_caption(name, keywords, group, stem),
               "dense_caption": dense_caption(name, keywords, group, subgroup)}
    for language, names in translated.items():
        if key not in names:
            sys.exit(f"CLDR has no {language} name for {key!r}")
        columns[f"caption_{language}"] = names[key]
    return columns


def rewrite_text_columns(output_dir: Path, annotations_path: Path) -> list[dict]:
    """Recompute the text columns of an existing ``metadata.jsonl`` (the images stay as they are)."""
    translated = read_translated_names(annotations_path, TRANSLATED_LANGUAGES)
    path = output_dir / "metadata.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    for row in rows:
        stem = Path(row["file_name"]).stem
        row.update(text_columns(row["emoji"].replace(VARIATION_SELECTOR_16, ""), row["name"], row["keywords"],
                                row["category"], row["subcategory"], stem, translated))
    write_metadata(path, rows)
    return rows


def write_metadata(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def build(output_dir: Path, font_path: Path, annotations_path: Path, emoji_test_path: Path,
          image_size: int, padding: int, test_fraction: float) -> list[dict]:
    """Render the images into ``output_dir/images`` and write ``output_dir/metadata.jsonl``; return the rows."""
    for path in (font_path, annotations_path, emoji_test_path):
        if not path.is_file():
            sys.exit(f"missing {path}: apt-get install fonts-noto-color-emoji unicode-cldr-core unicode-data")
    names, keywords = read_cldr_annotations(annotations_path)
    translated = read_translated_names(annotations_path, TRANSLATED_LANGUAGES)
    covered = font_code_points(font_path)
    renderer = EmojiRenderer(font_path, image_size, padding)

    image_dir = output_dir / "images"
    if image_dir.exists():
        shutil.rmtree(image_dir)
    image_dir.mkdir(parents=True)

    rows: list[dict] = []
    seen: set[str] = set()
    for entry in read_emoji_test(emoji_test_path):
        name = names.get(entry.key)
        if name is None or entry.key in seen or any(ord(char) not in covered for char in entry.key):
            continue
        image = renderer.render(entry.text)
        if image is None:
            continue
        seen.add(entry.key)
        file_name = f"images/{entry.stem}.png"
        image.save(output_dir / file_name, optimize=True)
        other_keywords = [word for word in keywords.get(entry.key, []) if word != name]
        rows.append({
            "file_name": file_name,
            "emoji": entry.text,
            "name": name,
            "keywords": other_keywords,
            **text_columns(entry.key, name, other_keywords, entry.group, entry.subgroup, entry.stem, translated),
            "category": entry.group,
            "subcategory": entry.subgroup,
            "split": "test" if stable_fraction(entry.stem) < test_fraction else "train",
        })

    write_metadata(output_dir / "metadata.jsonl", rows)
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--font", type=Path, default=DEFAULT_FONT)
    parser.add_argument("--annotations", type=Path, default=DEFAULT_ANNOTATIONS)
    parser.add_argument("--emoji-test", type=Path, default=DEFAULT_EMOJI_TEST)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--padding", type=int, default=4, help="white border in pixels (smaller PNGs)")
    parser.add_argument("--test-fraction", type=float, default=0.15)
    parser.add_argument("--text-only", action="store_true",
                        help="recompute only the text columns of the existing metadata.jsonl (no rendering)")
    args = parser.parse_args(argv)
    if args.text_only:
        rows = rewrite_text_columns(args.output_dir, args.annotations)
        print(f"rewrote the text columns of {len(rows)} emoji in {args.output_dir}")
        return
    rows = build(args.output_dir, args.font, args.annotations, args.emoji_test, args.image_size, args.padding,
                 args.test_fraction)
    test_rows = sum(row["split"] == "test" for row in rows)
    print(f"wrote {len(rows)} emoji ({len(rows) - test_rows} train, {test_rows} test) to {args.output_dir}")


if __name__ == "__main__":
    main()
