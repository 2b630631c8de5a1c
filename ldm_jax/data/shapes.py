"""A procedurally generated, captioned image set of geometric shapes, deterministic by seed (numpy + PIL only).

Each image holds one axis-aligned shape on a plain or two-tone background; its caption says what a tiny
text-to-image model has to learn and what `ldm_jax.data.shapes_eval` can check with plain pixel analysis:

- shape: circle, square, triangle (pointing up); every shape fills a bounding box of the same side;
- color: six saturated colours (`COLORS`), all far from each other and from the gray axis;
- position: the 3x3 grid cell of the shape's centroid (`POSITIONS`: "top left", "top", ..., "bottom right");
- size: small (side ~0.20 of the image) or large (~0.34);
- background: one achromatic colour (white, gray, black) or, for 1/4 of the images, two of them split into a top
  and a bottom half, named top first ("a white and black background": white above, black below). Object colours
  are chromatic and background colours are not, so they never coincide.

Samples are drawn from `np.random.default_rng([seed, index])`, so sample `i` does not depend on `n`. About 10% of
all attribute combinations (`is_held_out`, a fixed hash of the canonical caption) never appear in training sets;
`held_out_prompts` draws evaluation prompts from them only, so they are compositions the model has never seen.

Captions come from a few templates ("a red circle in the top left corner on a white background", "small blue
square, bottom, gray background", ...); with an rng, size is left out 30% of the time and the position or the
background 10% each, so short prompts such as "a blue square" are in distribution. `parse_caption` inverts them.

    python -m ldm_jax.data.shapes OUT_DIR --n 5000 --seed 0 --size 64
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {  # saturated, >= 100 apart in RGB, >= 110 from the gray axis
    "red": (220, 20, 20), "orange": (255, 128, 0), "yellow": (250, 230, 30),
    "green": (25, 165, 35), "blue": (25, 65, 230), "purple": (155, 35, 200),
}
BACKGROUNDS = {"white": (255, 255, 255), "gray": (128, 128, 128), "black": (0, 0, 0)}
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
SIZES = ("small", "large")
SIZE_FRACTION = {"small": 0.20, "large": 0.34}  # side of the shape's bounding box / image side
TWO_TONE_PROBABILITY = 0.25
HELD_OUT_MODULUS = 10  # combinations whose caption hash is 0 mod this are held out of training
SUPERSAMPLE = 4

_LONG_POSITION = {
    "top left": "in the top left corner", "top": "at the top", "top right": "in the top right corner",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left corner", "bottom": "at the bottom", "bottom right": "in the bottom right corner",
}
_SYNONYMS = {"grey": "gray", "violet": "purple", "big": "large", "huge": "large", "tiny": "small", "little": "small",
             "upper": "top", "lower": "bottom", "centre": "center", "middle": "center", "centered": "center",
             "circles": "circle", "disc": "circle", "disk": "circle", "squares": "square", "triangles": "triangle"}


@dataclasses.dataclass(frozen=True)
class Attributes:
    """What one image shows; any field may be None in a partial description (e.g. a parsed user prompt)."""

    shape: str | None = None
    color: str | None = None
    position: str | None = None
    size: str | None = None
    background: tuple[str, ...] | None = None  # (colour,) or (top colour, bottom colour)

    def __post_init__(self):
        for name, allowed in (("shape", SHAPES), ("color", COLORS), ("position", POSITIONS), ("size", SIZES)):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")
        if self.background is not None:
            bg = tuple(self.background)
            if not 1 <= len(bg) <= 2 or len(set(bg)) != len(bg) or any(c not in BACKGROUNDS for c in bg):
                raise ValueError(f"bad background {self.background!r}: one or two distinct of {', '.join(BACKGROUNDS)}")
            object.__setattr__(self, "background", bg)

    @property
    def complete(self) -> bool:
        return all(getattr(self, f.name) is not None for f in dataclasses.fields(self))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["background"] = list(self.background) if self.background is not None else None
        return d


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def is_held_out(attrs: Attributes) -> bool:
    """True for the ~10% of complete combinations reserved for evaluation (fixed, independent of any seed)."""
    return zlib.crc32(caption(attrs).encode()) % HELD_OUT_MODULUS == 0


def all_combinations() -> list[Attributes]:
    """Every complete combination of attributes, in a fixed order."""
    names = tuple(BACKGROUNDS)
    backgrounds = [(a,) for a in names] + [(a, b) for a in names for b in names if a != b]
    return [Attributes(*combo) for combo in itertools.product(SHAPES, COLORS, POSITIONS, SIZES, backgrounds)]


def sample_attributes(rng: np.random.Generator) -> Attributes:
    """Uniform shape, colour, position and size; a plain background, or a two-tone one with probability 1/4."""
    shape, color = _pick(rng, SHAPES), _pick(rng, tuple(COLORS))
    position, size = _pick(rng, POSITIONS), _pick(rng, SIZES)
    names = tuple(BACKGROUNDS)
    if rng.random() < TWO_TONE_PROBABILITY:
        top = int(rng.integers(len(names)))
        bottom = (top + 1 + int(rng.integers(len(names) - 1))) % len(names)
        background = (names[top], names[bottom])
    else:
        background = (_pick(rng, names),)
    return Attributes(shape, color, position, size, background)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(attrs: Attributes, rng: np.random.Generator | None = None) -> str:
    """A caption for `attrs`. Without rng: the canonical, complete one ("a small red circle in the top left corner on
    a white background"); with rng: a random template, leaving out size (30%), position (10%), background (10%)."""
    size, position, background = attrs.size, attrs.position, attrs.background
    template = 0
    if rng is not None:
        template = int(rng.integers(4))
        size = None if rng.random() < 0.3 else size
        position = None if rng.random() < 0.1 else position
        background = None if rng.random() < 0.1 else background
    obj = " ".join(w for w in (size, attrs.color, attrs.shape) if w)
    where = _LONG_POSITION[position] if position else None
    bg = " and ".join(background) + " background" if background else None
    if template == 0:
        return " ".join(p for p in (_article(obj), where, "on " + _article(bg) if bg else None) if p)
    if template == 1:
        return ", ".join(p for p in (" ".join(p for p in (_article(obj), where) if p), bg) if p)
    if template == 2:
        return ", ".join(p for p in (obj, position, bg) if p)
    return " ".join(p for p in (_article(bg) + " with" if bg else None, _article(obj), where) if p)


def parse_caption(text: str) -> Attributes:
    """Recover the attributes named in a caption or a simple prompt ("a blue square"); missing ones are None.

    Chromatic colour words name the object, achromatic ones the background (in order: top first); "top"/"bottom"
    and "left"/"right" combine into a cell ("at the top, on the left" is "top left"), "center" alone is the middle.
    """
    words = [_SYNONYMS.get(w, w) for w in re.findall(r"[a-z]+", text.lower())]
    first = lambda vocab: next((w for w in words if w in vocab), None)  # noqa: E731
    background = tuple(dict.fromkeys(w for w in words if w in BACKGROUNDS))[:2] or None
    vertical, horizontal = first(("top", "bottom")), first(("left", "right"))
    if vertical or horizontal:
        position = " ".join(w for w in (vertical, horizontal) if w)
    else:
        position = "center" if "center" in words else None
    return Attributes(first(SHAPES), first(COLORS), position, first(SIZES), background)


def _cell_center(position: str, size: int) -> tuple[float, float]:
    row, col = divmod(POSITIONS.index(position), 3)
    return (col + 0.5) * size / 3, (row + 0.5) * size / 3


def shape_alpha(shape: str, side: float, cx: float, cy: float, height: int, width: int | None = None) -> np.ndarray:
    """float64 [height, width] coverage in [0, 1] of `shape` with bounding-box side `side` and centroid (cx, cy)
    (pixel coordinates: pixel (i, j) covers [j, j + 1) x [i, i + 1)), drawn at SUPERSAMPLE x and box-filtered."""
    width = height if width is None else width
    above = side * 2 / 3 if shape == "triangle" else side / 2  # a triangle's centroid is at 2/3 of its height
    s = SUPERSAMPLE
    x0, x1, y0, y1 = (cx - side / 2) * s, (cx + side / 2) * s, (cy - above) * s, (cy - above + side) * s
    mask = Image.new("L", (width * s, height * s), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif shape == "triangle":
        draw.polygon(((x0, y1), (x1, y1), ((x0 + x1) / 2, y0)), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(mask.resize((width, height), Image.Resampling.BOX), np.float64) / 255.0


def render(attrs: Attributes, size: int = 64, rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 [size, size, 3]: the shape's anti-aliased coverage (`shape_alpha`) blended over the background.

    The shape's centroid sits at its cell's centre; with rng, its side varies by +-8% and its centroid by up to
    +-3.5% of the image side (staying inside the image and well inside the cell).
    """
    if not attrs.complete:
        raise ValueError(f"render needs complete attributes, got {attrs}")
    side = SIZE_FRACTION[attrs.size] * size
    cx, cy = _cell_center(attrs.position, size)
    if rng is not None:
        side *= rng.uniform(0.92, 1.08)
        cx, cy = cx + rng.uniform(-0.035, 0.035) * size, cy + rng.uniform(-0.035, 0.035) * size
    above = side * 2 / 3 if attrs.shape == "triangle" else side / 2
    margin = 1.0
    cx = float(np.clip(cx, side / 2 + margin, size - side / 2 - margin))
    cy = float(np.clip(cy, above + margin, size - (side - above) - margin))
    alpha = shape_alpha(attrs.shape, side, cx, cy, size)[..., None]
    background = np.empty((size, size, 3))
    background[:] = BACKGROUNDS[attrs.background[0]]
    background[size // 2:] = BACKGROUNDS[attrs.background[-1]]
    image = background * (1 - alpha) + np.array(COLORS[attrs.color], np.float64) * alpha
    return np.clip(image.round(), 0, 255).astype(np.uint8)


def _sample(seed: int, index: int, size: int, exclude_held_out: bool):
    rng = np.random.default_rng([seed, index])
    attrs = sample_attributes(rng)
    while exclude_held_out and is_held_out(attrs):
        attrs = sample_attributes(rng)
    text = caption(attrs, rng)
    return render(attrs, size, rng), text, attrs


def make_dataset(n: int, seed: int, size: int = 64, *, exclude_held_out: bool = True):
    """[(uint8 image [size, size, 3], caption, Attributes)] * n; held-out combinations are skipped by default."""
    return [_sample(seed, i, size, exclude_held_out) for i in range(n)]


def held_out_prompts(n: int, seed: int = 0) -> list[tuple[str, Attributes]]:
    """n distinct (complete caption, Attributes) among the held-out combinations, never in a training set."""
    available = sum(map(is_held_out, all_combinations()))
    if n > available:
        raise ValueError(f"only {available} held-out combinations exist, {n} requested")
    rng = np.random.default_rng([seed, 0x5EED, 1])
    pool = []
    while len(pool) < n:
        attrs = sample_attributes(rng)
        if is_held_out(attrs) and attrs not in pool:
            pool.append(attrs)
    prompts = []
    for attrs in pool:
        text = caption(attrs, rng)
        while parse_caption(text) != attrs:  # a template that left something out: draw again
            text = caption(attrs, rng)
        prompts.append((text, attrs))
    return prompts


def write_dataset(out_dir, n: int, seed: int, size: int = 64, *, overwrite: bool = False) -> Path:
    """Write n PNGs and `metadata.jsonl` ({"file_name", "text", "attributes"} per line, the imagefolder layout
    `ldm_jax.train.data.scan_dataset` reads) into a temporary folder next to `out_dir`, then rename it into place."""
    if n < 1 or size < 16:
        raise ValueError(f"need n >= 1 and size >= 16, got n={n}, size={size}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        width = max(5, len(str(n - 1)))
        with open(tmp / "metadata.jsonl", "w", encoding="utf-8") as meta:
            for i in range(n):
                image, text, attrs = _sample(seed, i, size, True)
                name = f"{i:0{width}d}.png"
                Image.fromarray(image).save(tmp / name, optimize=False)
                meta.write(json.dumps({"file_name": name, "text": text, "attributes": attrs.to_dict()}) + "\n")
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "data")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ldm_jax.data.shapes", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        out = write_dataset(args.out_dir, args.n, args.seed, args.size, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as e:
        parser.error(str(e))
    print(f"wrote {args.n} images to {out}")


if __name__ == "__main__":
    main()
