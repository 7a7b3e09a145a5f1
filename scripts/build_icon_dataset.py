#!/usr/bin/env python
"""Build an image–caption dataset from an icon font published on the npm registry (for stage-2 CLIP experiments).

Every icon that the source's metadata names, that its font maps (``cmap``) and that draws something visible is
rendered black on white: the glyph is scaled to fit a 56x56 box (aspect ratio kept) and centred in a 64x64 RGB PNG.
Each row has a short caption (the icon's human name), a long caption (one sentence built from the name, its tags,
aliases or search terms, and its category, with a template picked by a hash of the icon name), a ``category`` and a
deterministic ~85/15 ``split`` (hash of the icon name). Icons whose names normalise to the same short caption are
kept once (the first by icon name). The result is an ``imagefolder`` dataset: ``images/<code point>.png`` (lower-case
hex, like the emoji set: icon names such as ``test-tube`` or ``train`` would make ``datasets`` infer splits from the
file names), ``metadata.jsonl`` (the icon name is the ``icon`` column) and ``ATTRIBUTION.md``.

Sources (downloaded with ``npm pack <package>@<version>``; versions and tarball SHA-1s are pinned below):

* ``mdi`` — Material Design Icons 7.4.47: the glyphs from ``@mdi/font`` (``fonts/materialdesignicons-webfont.ttf``)
  and the names, aliases and tags from ``@mdi/svg`` (``meta.json``; ``@mdi/font`` ships no tags). Pictogrammers Free
  License: icons and fonts Apache-2.0.
* ``fontawesome`` — Font Awesome Free 6.7.2 (``@fortawesome/fontawesome-free``): ``webfonts/fa-solid-900.ttf``,
  ``fa-regular-400.ttf``, ``fa-brands-400.ttf``; labels, unicodes, search terms, aliases and free styles from
  ``metadata/icon-families.json``; categories from ``metadata/categories.yml``. Icons CC BY 4.0, fonts SIL OFL 1.1.
  Version 6.7.2 is the last release that ships TrueType webfonts: 7.x has only WOFF2, which fontTools cannot read
  without the ``brotli`` module. An icon free in several styles is drawn once, in the first of solid, regular,
  brands; brand icons, which ``categories.yml`` does not list, get the category ``Brands``.

The output depends only on the pinned tarballs and on the Pillow / FreeType / zlib versions, so reruns are
byte-identical. Usage: ``python scripts/build_icon_dataset.py {mdi,fontawesome} --output DIR [--max-icons N]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont


@dataclass(frozen=True)
class NpmPackage:
    """One pinned npm tarball: name, exact version and the registry's ``dist.shasum`` (SHA-1 of the ``.tgz``)."""

    name: str
    version: str
    shasum: str

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"


MDI_FONT = NpmPackage("@mdi/font", "7.4.47", "2ae522867da3a5c88b738d54b403eb91471903af")
MDI_SVG = NpmPackage("@mdi/svg", "7.4.47", "f8e5516aae129764a76d1bb2f27e55bee03e6e90")
FONTAWESOME = NpmPackage("@fortawesome/fontawesome-free", "6.7.2", "8249de9b7e22fcb3ceb5e66090c30a1d5492b81a")

FA_FONTS = {"solid": "webfonts/fa-solid-900.ttf", "regular": "webfonts/fa-regular-400.ttf",
            "brands": "webfonts/fa-brands-400.ttf"}
FA_STYLE_ORDER = ("solid", "regular", "brands")  # the style drawn when an icon is free in several

RENDER_SIZE = 256  # font size in pixels of the large render that is then cropped to the ink and downsized
MAX_KEYWORDS = 6  # keywords in a long caption, so that it stays well under CLIP's 77 tokens

# Long-caption templates, picked per icon by a hash of its name. ``{a_name}`` is the name with an indefinite
# article where one reads naturally, ``{keywords}`` the tags / aliases / search terms, ``{group}`` the category.
TEMPLATES_KEYWORDS_GROUP = (
    "An icon of {a_name}, tagged {keywords}.",
    "A simple black {group} icon showing {a_name}; related words: {keywords}.",
    "{A_name} pictogram from the {group} set, associated with {keywords}.",
    "This flat monochrome glyph depicts {a_name} and suggests {keywords}.",
    "A black-on-white symbol of {a_name} ({group}), evoking {keywords}.",
)
TEMPLATES_KEYWORDS = (
    "An icon of {a_name}, tagged {keywords}.",
    "A simple black icon showing {a_name}; related words: {keywords}.",
    "This flat monochrome glyph depicts {a_name} and suggests {keywords}.",
)
TEMPLATES_GROUP = (
    "An icon of {a_name} from the {group} set.",
    "A simple black {group} icon showing {a_name}.",
    "This flat monochrome glyph depicts {a_name}.",
)
TEMPLATES_NAME_ONLY = (
    "An icon of {a_name}.",
    "A simple black icon showing {a_name}.",
    "This flat monochrome glyph depicts {a_name}.",
)


@dataclass
class Icon:
    """One icon to render: file stem, code point, font, caption material."""

    stem: str  # the source's icon name, e.g. ``arrow-left-bold``; the key of the split and template hashes
    code_point: int
    font_path: Path
    name: str  # the short caption
    keywords: list[str]  # tags, aliases or search terms, most informative first, without the name
    category: str
    style: str = ""
    brand: bool = False  # brand names read best without an article ("an icon of github")
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- download


def npm_fetch(package: NpmPackage, work_dir: Path) -> Path:
    """``npm pack`` the pinned tarball into ``work_dir``, check its SHA-1 and unpack it; return its ``package/``."""
    result = subprocess.run(["npm", "pack", package.spec, "--json", "--pack-destination", str(work_dir)],
                            check=True, capture_output=True, text=True)
    tarball = work_dir / json.loads(result.stdout)[0]["filename"]
    digest = hashlib.sha1(tarball.read_bytes()).hexdigest()
    if digest != package.shasum:
        sys.exit(f"{package.spec}: tarball SHA-1 {digest} != pinned {package.shasum}")
    target = work_dir / tarball.name.removesuffix(".tgz")
    with tarfile.open(tarball) as archive:
        members = [m for m in archive.getmembers()
                   if m.isfile() and m.name.startswith("package/") and ".." not in Path(m.name).parts]
        archive.extractall(target, members=members)
    return target / "package"


def font_code_points(path: Path) -> set[int]:
    """Code points mapped by the font's ``cmap``."""
    logging.getLogger("fontTools").setLevel(logging.ERROR)  # the MDI font's harmless "extra bytes in post" warning
    font = TTFont(str(path), lazy=True)
    try:
        return set(font.getBestCmap())
    finally:
        font.close()


# ----------------------------------------------------------------------------------------------- text


def words(text: str) -> str:
    """Icon name or alias to caption words: hyphens / underscores to spaces, lower case, single spaces."""
    return " ".join(re.sub(r"[-_]+", " ", text).lower().split())


def group_words(label: str) -> list[str]:
    """A category label such as ``Transportation + Road`` or ``Developer / Languages`` as lower-case words."""
    return [part.strip().lower() for part in re.split(r"\s[/+&]\s", label) if part.strip()]


def unique_keywords(candidates: list[str], name: str) -> list[str]:
    """Keywords in order, case-insensitively de-duplicated, without the name, at most ``MAX_KEYWORDS``."""
    seen = {name.lower()}
    kept: list[str] = []
    for keyword in candidates:
        keyword = " ".join(keyword.split())
        if keyword and keyword.lower() not in seen:
            seen.add(keyword.lower())
            kept.append(keyword)
    return kept[:MAX_KEYWORDS]


def stable_fraction(stem: str, part: int = 0) -> float:
    """A number in [0, 1) fixed by the icon name: bytes ``8*part`` to ``8*part+8`` of its SHA-256.

    Part 0 decides the split, part 1 the caption template, so the two choices are independent.
    """
    digest = hashlib.sha256(stem.encode("utf-8")).digest()
    return int.from_bytes(digest[8 * part:8 * part + 8], "big") / 2**64


def with_article(name: str) -> str:
    """Prefix ``a``/``an`` unless the name looks plural, starts with a digit or symbol, or is a gerund."""
    head = re.split(r" with | in | of | on | and ", name)[0].strip()
    last = head.split()[-1] if head.split() else head
    looks_plural = last.endswith("s") and not last.endswith(("ss", "us", "is")) and len(last) > 3
    first = name.split()[0]
    gerund = first.endswith("ing") and len(first) > 5 and not first.endswith(("ling", "thing"))
    if looks_plural or gerund or not name[0].isalpha():
        return name
    return ("an " if name[0].lower() in "aeiou" else "a ") + name


def long_caption(icon: Icon) -> str:
    """A deterministic, varied sentence from the name, keywords and category (without repeating the category)."""
    group = "brand" if icon.brand and icon.category == "Brands" else " and ".join(group_words(icon.category))
    keywords = icon.keywords
    if group:
        keywords = [k for k in keywords if k.lower() not in group_words(icon.category)]
    if keywords and group:
        templates = TEMPLATES_KEYWORDS_GROUP
    elif keywords:
        templates = TEMPLATES_KEYWORDS
    elif group:
        templates = TEMPLATES_GROUP
    else:
        templates = TEMPLATES_NAME_ONLY
    pick = int(stable_fraction(icon.stem, part=1) * len(templates))
    a_name = icon.name if icon.brand else with_article(icon.name)
    return templates[pick].format(a_name=a_name, A_name=a_name[0].upper() + a_name[1:],
                                  keywords=", ".join(keywords), group=group)


# ----------------------------------------------------------------------------------------------- sources


MDI_FILES = ["@mdi/font: fonts/materialdesignicons-webfont.ttf", "@mdi/svg: meta.json"]
FA_FILES = [*FA_FONTS.values(), "metadata/icon-families.json", "metadata/categories.yml"]


def mdi_icons(work_dir: Path) -> tuple[list[Icon], list[tuple[NpmPackage, Path]]]:
    """Material Design Icons: ``meta.json`` from ``@mdi/svg``, glyphs from the ``@mdi/font`` webfont."""
    font_dir, svg_dir = npm_fetch(MDI_FONT, work_dir), npm_fetch(MDI_SVG, work_dir)
    font_path = font_dir / "fonts" / "materialdesignicons-webfont.ttf"
    icons = []
    for entry in json.loads((svg_dir / "meta.json").read_text(encoding="utf-8")):
        name = words(entry["name"])
        tags = [word for tag in entry["tags"] for word in group_words(tag)]
        icons.append(Icon(stem=entry["name"], code_point=int(entry["codepoint"], 16), font_path=font_path,
                          name=name, keywords=unique_keywords(tags + [words(a) for a in entry["aliases"]], name),
                          category=entry["tags"][0] if entry["tags"] else "",
                          extra={"tags": entry["tags"], "aliases": entry["aliases"],
                                 "deprecated": bool(entry.get("deprecated"))}))
    return icons, [(MDI_FONT, font_dir), (MDI_SVG, svg_dir)]


def read_fa_categories(path: Path) -> dict[str, str]:
    """``categories.yml`` (``<key>:`` / ``  icons:`` / ``    - <icon>`` / ``  label: <label>``) as icon -> first
    category label, categories in file order. A small parser for this fixed layout keeps the script stdlib-only."""
    members: list[tuple[str, list[str]]] = []  # (label, icons) per category
    icons: list[str] = []
    label = ""
    unquote = lambda text: text.strip().strip("'\"")  # noqa: E731
    for line in path.read_text(encoding="utf-8").splitlines():
        if re.match(r"^[^\s#].*:\s*$", line):
            if icons or label:
                members.append((label, icons))
            icons, label = [], ""
        elif line.startswith("    - "):
            icons.append(unquote(line[6:]))
        elif line.startswith("  label:"):
            label = unquote(line.split(":", 1)[1])
    if icons or label:
        members.append((label, icons))
    if not members or any(not label for label, _ in members):
        sys.exit(f"unexpected layout of {path}")
    first: dict[str, str] = {}
    for label, icon_names in members:
        for icon in icon_names:
            first.setdefault(icon, label)
    return first


def fontawesome_icons(work_dir: Path) -> tuple[list[Icon], list[tuple[NpmPackage, Path]]]:
    """Font Awesome Free: ``icon-families.json`` (free styles only), ``categories.yml`` and the three webfonts."""
    package_dir = npm_fetch(FONTAWESOME, work_dir)
    categories = read_fa_categories(package_dir / "metadata" / "categories.yml")
    metadata = json.loads((package_dir / "metadata" / "icon-families.json").read_text(encoding="utf-8"))
    icons = []
    for stem, entry in metadata.items():
        free = {style["style"] for style in entry.get("familyStylesByLicense", {}).get("free", [])
                if style.get("family") == "classic"}
        styles = [style for style in FA_STYLE_ORDER if style in free]
        if not styles:
            continue
        style = styles[0]
        name = " ".join(entry["label"].lower().split())
        aliases = entry.get("aliases", {}).get("names", [])
        category = categories.get(stem, "Brands" if style == "brands" else "")
        icons.append(Icon(stem=stem, code_point=int(entry["unicode"], 16),
                          font_path=package_dir / FA_FONTS[style], name=name,
                          keywords=unique_keywords([" ".join(term.lower().split()) for term in entry["search"]["terms"]]
                                                   + [words(alias) for alias in aliases], name),
                          category=category, style=style, brand=style == "brands",
                          extra={"styles": styles, "search_terms": entry["search"]["terms"], "aliases": aliases}))
    return icons, [(FONTAWESOME, package_dir)]


SOURCES = {"mdi": mdi_icons, "fontawesome": fontawesome_icons}


# ----------------------------------------------------------------------------------------------- rendering


class GlyphRenderer:
    """Draw one glyph large, crop it to its ink, fit it into ``inner`` x ``inner`` and centre it on white."""

    def __init__(self, image_size: int, inner: int) -> None:
        self.image_size, self.inner = image_size, inner
        self.fonts: dict[Path, ImageFont.FreeTypeFont] = {}

    def render(self, font_path: Path, code_point: int) -> Image.Image | None:
        """The glyph as an RGB image, or ``None`` when it draws nothing visible."""
        if font_path not in self.fonts:
            self.fonts[font_path] = ImageFont.truetype(str(font_path), RENDER_SIZE)
        font, text = self.fonts[font_path], chr(code_point)
        left, top, right, bottom = font.getbbox(text)
        if right <= left or bottom <= top:
            return None
        canvas = Image.new("L", (right - left + 4, bottom - top + 4), 255)
        ImageDraw.Draw(canvas).text((2 - left, 2 - top), text, font=font, fill=0)
        ink = canvas.point(lambda value: 255 - value).getbbox()
        if ink is None:
            return None
        glyph = canvas.crop(ink)
        scale = self.inner / max(glyph.size)
        size = (max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale)))
        glyph = glyph.resize(size, Image.Resampling.LANCZOS)
        image = Image.new("L", (self.image_size, self.image_size), 255)
        image.paste(glyph, ((self.image_size - size[0]) // 2, (self.image_size - size[1]) // 2))
        if image.getextrema()[0] >= 250:  # (nearly) uniformly white after downsizing
            return None
        return image.convert("RGB")


# ----------------------------------------------------------------------------------------------- output


def license_text(package_dir: Path) -> tuple[str, str]:
    """The tarball's license file name and text."""
    for candidate in ("LICENSE", "LICENSE.txt", "LICENSE.md"):
        path = package_dir / candidate
        if path.is_file():
            return candidate, path.read_text(encoding="utf-8").strip()
    return "", ""


LICENSE_SUMMARY = {
    "mdi": ("Pictogrammers Free License (`LICENSE` in both tarballs, `package.json` license `Apache-2.0`): icons "
            "Apache 2.0 (\"Some of the icons are redistributed under the Apache 2.0 license. All other icons are "
            "either redistributed under their respective licenses or are distributed under the Apache 2.0 "
            "license.\"); web and desktop fonts Apache 2.0; code MIT. The images here are renderings of the font's "
            "glyphs; names, aliases and tags come from `meta.json`."),
    "fontawesome": ("Font Awesome Free License (`LICENSE.txt`, `package.json` license "
                    "`(CC-BY-4.0 AND OFL-1.1 AND MIT)`): icons CC BY 4.0 (applies to icons packaged as SVG and JS), "
                    "fonts SIL OFL 1.1 (applies to icons packaged as web and desktop font files; Reserved Font Name "
                    "\"Font Awesome\"), code MIT. The images here are renderings of the OFL webfonts' glyphs; "
                    "attribution: Font Awesome Free by Fonticons, Inc. (https://fontawesome.com). Brand icons are "
                    "trademarks of their respective owners and may only be used to represent the company, product "
                    "or service they refer to."),
}


def write_attribution(output_dir: Path, source: str, packages: list[tuple[NpmPackage, Path]],
                      files: list[str]) -> None:
    lines = [f"# Attribution: `{source}` icon dataset", "",
             "Built by `scripts/build_icon_dataset.py` from these npm tarballs (`npm pack <package>@<version>`):", ""]
    lines += [f"* `{package.spec}` (tarball SHA-1 `{package.shasum}`)" for package, _ in packages]
    lines += ["", "Files used: " + ", ".join(f"`{name}`" for name in files) + ".", "",
              "## License", "", LICENSE_SUMMARY[source], ""]
    texts = {license_text(directory) for _, directory in packages}
    for file_name, text in sorted(texts):
        if text:
            lines += [f"## `{file_name}` as shipped", "", "```text", text, "```", ""]
    (output_dir / "ATTRIBUTION.md").write_text("\n".join(lines), encoding="utf-8")


def build(source: str, output_dir: Path, max_icons: int | None, image_size: int, inner: int,
          test_fraction: float) -> tuple[list[dict], dict[str, list[str]]]:
    """Download, render and write the dataset; return the rows and the skipped icon names by reason."""
    with tempfile.TemporaryDirectory(prefix="icons-npm-") as temp:
        icons, packages = SOURCES[source](Path(temp))
        icons.sort(key=lambda icon: icon.stem)
        mapped = {path: font_code_points(path) for path in {icon.font_path for icon in icons}}
        renderer = GlyphRenderer(image_size, inner)

        image_dir = output_dir / "images"
        if image_dir.exists():
            shutil.rmtree(image_dir)
        image_dir.mkdir(parents=True)

        rows: list[dict] = []
        skipped: dict[str, list[str]] = {"not in font cmap": [], "renders empty": [], "duplicate caption": []}
        seen: set[str] = set()
        for icon in icons:
            if max_icons is not None and len(rows) >= max_icons:
                break
            if icon.code_point not in mapped[icon.font_path]:
                skipped["not in font cmap"].append(icon.stem)
                continue
            if icon.name in seen:
                skipped["duplicate caption"].append(icon.stem)
                continue
            image = renderer.render(icon.font_path, icon.code_point)
            if image is None:
                skipped["renders empty"].append(icon.stem)
                continue
            seen.add(icon.name)
            file_name = f"images/{icon.code_point:x}.png"
            if (output_dir / file_name).exists():
                sys.exit(f"two icons share the code point of {icon.stem}: {file_name}")
            image.save(output_dir / file_name, optimize=True)
            rows.append({
                "file_name": file_name,
                "icon": icon.stem,
                "codepoint": f"U+{icon.code_point:04X}",
                "style": icon.style,
                **icon.extra,
                "keywords": icon.keywords,
                "short_caption": icon.name,
                "long_caption": long_caption(icon),
                "category": icon.category,
                "split": "test" if stable_fraction(icon.stem) < test_fraction else "train",
            })
        write_attribution(output_dir, source, packages, MDI_FILES if source == "mdi" else FA_FILES)

    with (output_dir / "metadata.jsonl").open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return rows, skipped


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", choices=sorted(SOURCES))
    parser.add_argument("--output", type=Path, required=True, help="dataset directory (images/ is replaced)")
    parser.add_argument("--max-icons", type=int, default=None, help="stop after this many rows (by icon name)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--inner", type=int, default=56, help="the glyph is scaled to fit this square")
    parser.add_argument("--test-fraction", type=float, default=0.15)
    args = parser.parse_args(argv)
    rows, skipped = build(args.source, args.output, args.max_icons, args.image_size, args.inner, args.test_fraction)
    test_rows = sum(row["split"] == "test" for row in rows)
    print(f"wrote {len(rows)} icons ({len(rows) - test_rows} train, {test_rows} test) to {args.output}")
    if rows:
        print("median words: short caption "
              f"{statistics.median(len(row['short_caption'].split()) for row in rows)}, long caption "
              f"{statistics.median(len(row['long_caption'].split()) for row in rows)}")
    for reason, names in skipped.items():
        if names:
            print(f"skipped {len(names)} ({reason}): {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}")
    for row in rows[:: max(1, len(rows) // 2)][:2]:
        print(json.dumps({key: row[key] for key in ("file_name", "short_caption", "long_caption", "category",
                                                    "split")}, ensure_ascii=False))


if __name__ == "__main__":
    main()
