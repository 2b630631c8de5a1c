"""Prompt adherence of shapes images by plain pixel analysis (numpy + PIL, no learned classifier).

`analyse` relies on the vocabulary of `ldm_jax.data.shapes`: backgrounds are achromatic, objects are saturated.
Images larger than 128 pixels are box-filtered down to 128 first (everything is measured relative to the image).

1. Background: the pixels of a border ring near the gray axis (after a 3x3 median filter); each is named by its
   brightness (nearest of white, gray, black); the majority of the top part and of the bottom part give the
   background ((top,) if they agree, else (top, bottom)). Their mean chromatic offset is the tint (a colour cast).
2. Object: "chroma", the distance of a tint-corrected pixel from the gray axis, ignores brightness and the blend
   along a two-tone split; the object is the largest 8-connected component with chroma > 45 (none: not found).
3. Colour: every saturated pixel of the object votes for the palette colour c whose blend segment
   [its row's background, c] passes nearest to it, so blur and anti-aliasing (which mix the object with the
   background) do not pull dark yellow towards orange; the majority wins.
4. Coverage: each pixel near the object is unmixed linearly between its row's background (measured on the left
   and right border strips) and the object colour; this soft mask is linear in the pixels, so noise averages out
   and blur only moves mass around. Position: the 3x3 cell of its centroid.
5. Shape and size: each shape's template, sized from the soft area and blurred by the gaussian whose variance
   makes up the difference to the soft mask's (blur adds sigma^2 to the variance), is fitted to the soft mask
   over a few sizes with a free amplitude; the smallest squared error names the shape, its side the size.

`degrade` imitates the blur, noise, compression and colour cast of generated images, to test the analysis.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, ImageFilter

from ldm_jax.data.shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, Attributes, shape_alpha

CHROMA_THRESHOLD = 45.0  # background tints/noise stay below, every palette colour is >= 110
MIN_AREA_FRACTION = 0.004  # smaller components are noise, not an object
BORDER_FRACTION = 0.06  # width of the border ring that shows the background
MAX_RESOLUTION = 128
LARGE_SIDE_FRACTION = 0.26  # between the small (<= 0.216) and large (>= 0.313) sides of `shapes`
SIDE_SCALES = (0.8, 0.87, 0.93, 1.0, 1.07, 1.15, 1.25)  # template sides tried, relative to the soft area's
REGION_RADIUS = 4  # pixels around the object's component that its blurred edge may reach
_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area / bounding-box area
ATTRIBUTES = ("shape", "color", "position", "size", "background")
_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], np.float64)
_BG_NAMES = tuple(BACKGROUNDS)
_BG_LEVELS = np.array([np.mean(BACKGROUNDS[c]) for c in _BG_NAMES])


@dataclasses.dataclass(frozen=True)
class Analysis:
    """What the pixels show. When `found` is False only `background` is meaningful."""

    found: bool
    background: tuple[str, ...]
    color: str | None = None
    position: str | None = None
    size: str | None = None
    shape: str | None = None
    centroid: tuple[float, float] | None = None  # (x, y) in pixels
    area_fraction: float = 0.0  # soft object area / image area
    side_fraction: float = 0.0  # bounding-box side of the best-fitting shape / image side
    blur: float = 0.0  # gaussian sigma (pixels) of the best fit
    shape_errors: dict | None = None  # shape -> mean squared error of its blurred template
    color_votes: dict | None = None  # colour -> fraction of the object's pixels

    def as_attributes(self) -> Attributes:
        return Attributes(self.shape, self.color, self.position, self.size, self.background)


def _gray_axis_distance(rgb: np.ndarray) -> np.ndarray:
    return np.linalg.norm(rgb - rgb.mean(axis=-1, keepdims=True), axis=-1)


def _border(h: int, w: int) -> int:
    return max(1, round(BORDER_FRACTION * min(h, w)))


def _background(img: np.ndarray, achromatic: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """(names, tint [3]) from the achromatic pixels of the border ring (see the module docstring)."""
    h, w, _ = img.shape
    b = _border(h, w)
    ys, xs = np.mgrid[:h, :w]
    ring = (ys < b) | (ys >= h - b) | (xs < b) | (xs >= w - b)
    names = []
    for part in (ys < 0.4 * h, ys >= 0.6 * h):
        sel = ring & part & achromatic
        if sel.sum() < 4:  # the border is all colour: fall back on brightness alone
            sel = ring & part
        votes = np.abs(img[sel].mean(axis=-1)[:, None] - _BG_LEVELS[None]).argmin(axis=1)
        names.append(_BG_NAMES[np.bincount(votes, minlength=len(_BG_NAMES)).argmax()])
    bg_pixels = img[ring & achromatic] if (ring & achromatic).any() else img[ring]
    tint = (bg_pixels - bg_pixels.mean(axis=-1, keepdims=True)).mean(axis=0)
    return ((names[0],) if names[0] == names[1] else tuple(names)), tint


def _row_backgrounds(img: np.ndarray, achromatic: np.ndarray) -> np.ndarray:
    """[H, 3]: each row's background colour, the mean of its achromatic pixels in the left and right border strips
    (so a blurred two-tone split or a vertical gradient is followed); rows without any are interpolated."""
    h, w, _ = img.shape
    b = _border(h, w)
    strips = np.concatenate([img[:, :b], img[:, w - b:]], axis=1)
    keep = np.concatenate([achromatic[:, :b], achromatic[:, w - b:]], axis=1)
    counts = keep.sum(axis=1)
    valid = counts > 0
    if not valid.any():
        return strips.mean(axis=1)
    means = (strips * keep[..., None]).sum(axis=1)[valid] / counts[valid, None]
    rows = np.arange(h)
    return np.stack([np.interp(rows, rows[valid], means[:, c]) for c in range(3)], axis=1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (iterative flood fill)."""
    h, w = mask.shape
    labels = np.zeros(mask.shape, np.int32)
    best, best_size, label = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0], stack, size = label, [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = label
                        stack.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best else np.zeros_like(mask)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    img = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * radius + 1))
    return np.asarray(img) > 0


def _gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    if sigma < 0.05:
        return a

    def matrix(n):
        d = np.arange(n)[:, None] - np.arange(n)[None]
        k = np.exp(-0.5 * (d / sigma) ** 2)
        return k / k.sum(axis=1, keepdims=True)

    return matrix(a.shape[0]) @ a @ matrix(a.shape[1]).T


def _variance(a: np.ndarray) -> float:
    """Mean of the vertical and horizontal variances of a mass distribution [H, W]."""
    total, ys, xs = a.sum(), np.arange(a.shape[0]), np.arange(a.shape[1])
    rows, cols = a.sum(axis=1) / total, a.sum(axis=0) / total
    return 0.5 * ((rows * ys ** 2).sum() - (rows * ys).sum() ** 2 + (cols * xs ** 2).sum() - (cols * xs).sum() ** 2)


def _fit_shapes(soft: np.ndarray, cx: float, cy: float) -> dict:
    """shape -> (error, side, sigma): the best k * blur_sigma(template(side)) fit of `soft` for each shape.

    For each side in a range around the one implied by the soft area, sigma makes the template's variance match
    the soft mask's (blur adds sigma^2 to it) and the amplitude k is solved by least squares.
    """
    h, w = soft.shape
    mass, variance = soft.sum(), _variance(soft)
    fits = {}
    for shape in SHAPES:
        best = (np.inf, 0.0, 0.0)
        for scale in SIDE_SCALES:
            side = float(np.sqrt(mass / _FILL[shape])) * scale
            template = shape_alpha(shape, side, cx, cy, h, w)
            sigma = float(np.sqrt(max(variance - _variance(template), 0.0)))
            predicted = _gaussian_blur(template, sigma)
            k = (predicted * soft).sum() / max((predicted ** 2).sum(), 1e-9)
            error = float(((k * predicted - soft) ** 2).sum() / mass)
            best = min(best, (error, side * k ** 0.5, sigma))
        fits[shape] = best
    return fits


def _vote_colors(pixels: np.ndarray, backgrounds: np.ndarray, tint: np.ndarray) -> np.ndarray:
    """Per pixel, the palette colour c whose blend segment [background, c + tint] passes nearest to it."""
    ends = _PALETTE[None] + tint - backgrounds[:, None]  # [n, k, 3]
    offsets = (pixels - backgrounds)[:, None]  # [n, 1, 3]
    t = np.clip((offsets * ends).sum(-1) / np.maximum((ends ** 2).sum(-1), 1e-9), 0.0, 1.0)
    return np.linalg.norm(offsets - t[..., None] * ends, axis=-1).argmin(axis=1)


def analyse(image: np.ndarray) -> Analysis:
    """Background, object colour, position, size and shape of a uint8 [H, W, 3] image (see the module docstring)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    if min(pil.size) > MAX_RESOLUTION:
        scale = MAX_RESOLUTION / min(pil.size)
        pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.Resampling.BOX)
    raw = np.asarray(pil, np.float64)
    h, w, _ = raw.shape
    img = np.asarray(pil.filter(ImageFilter.MedianFilter(3)), np.float64)
    achromatic = _gray_axis_distance(img) < 2 * CHROMA_THRESHOLD
    background, tint = _background(img, achromatic)
    chroma = _gray_axis_distance(img - tint)
    component = _largest_component(chroma > CHROMA_THRESHOLD)
    if component.sum() < MIN_AREA_FRACTION * h * w:
        return Analysis(found=False, background=background)
    row_bg = _row_backgrounds(raw, achromatic)
    colored = component & (chroma >= 0.5 * np.percentile(chroma[component], 90))
    votes = np.bincount(_vote_colors(img[colored], row_bg[np.nonzero(colored)[0]], tint), minlength=len(_PALETTE))
    color = _PALETTE_NAMES[int(votes.argmax())]
    # coverage: the linear unmixing of each pixel between its row's background and the object colour
    towards = _PALETTE[int(votes.argmax())] + tint - row_bg  # [H, 3]
    alpha = ((raw - row_bg[:, None]) * towards[:, None]).sum(-1) / np.maximum((towards ** 2).sum(-1), 1e-9)[:, None]
    region = _dilate(component, REGION_RADIUS)
    soft = np.where(region, np.clip(alpha, -1.0, 1.5), 0.0)
    area = soft.sum()
    if area < 0.5 * MIN_AREA_FRACTION * h * w:
        return Analysis(found=False, background=background)
    ys, xs = np.mgrid[:h, :w]
    cx, cy = float((soft * (xs + 0.5)).sum() / area), float((soft * (ys + 0.5)).sum() / area)
    col, row = min(max(int(3 * cx / w), 0), 2), min(max(int(3 * cy / h), 0), 2)
    rows, cols = np.nonzero(region)
    top, left = max(rows.min() - 2, 0), max(cols.min() - 2, 0)
    window = soft[top:rows.max() + 3, left:cols.max() + 3]
    fits = _fit_shapes(window, cx - left, cy - top)
    shape = min(fits, key=lambda k: fits[k][0])
    _, side, sigma = fits[shape]
    side_fraction = side / min(h, w)
    return Analysis(
        found=True, background=background, color=color,
        position=POSITIONS[3 * row + col], size="large" if side_fraction > LARGE_SIDE_FRACTION else "small",
        shape=shape, centroid=(cx, cy), area_fraction=float(area / (h * w)), side_fraction=side_fraction,
        blur=sigma, shape_errors={k: v[0] for k, v in fits.items()},
        color_votes={c: float(v / votes.sum()) for c, v in zip(_PALETTE_NAMES, votes)})


def matches(analysis: Analysis, attrs: Attributes) -> dict[str, bool]:
    """Per attribute named in `attrs` (None ones are skipped): does the analysis agree? All False if not found."""
    result = {}
    for name in ATTRIBUTES:
        wanted = getattr(attrs, name)
        if wanted is not None:
            result[name] = bool(analysis.found and getattr(analysis, name) == wanted)
    return result


def adherence(images, attrs_list) -> dict:
    """Accuracy per attribute (over the images whose attrs name it), `found` rate, and `all`: the fraction of images
    whose colour, position and background all match (`all_with_shape` adds the shape); `per_image`: the `matches`
    dict of each image. An image where no object is found fails every attribute, background included."""
    images, attrs_list = list(images), list(attrs_list)
    if len(images) != len(attrs_list):
        raise ValueError(f"{len(images)} images but {len(attrs_list)} attribute sets")
    rows, found = [], 0
    for image, attrs in zip(images, attrs_list):
        analysis = analyse(image)
        found += analysis.found
        rows.append(matches(analysis, attrs))
    report: dict = {"n": len(rows), "found": found / max(len(rows), 1)}
    for name in ATTRIBUTES:
        values = [r[name] for r in rows if name in r]
        if values:
            report[name] = sum(values) / len(values)
    for key, names in (("all", ("color", "position", "background")),
                       ("all_with_shape", ("color", "position", "background", "shape"))):
        report[key] = sum(all(r.get(k, True) for k in names) for r in rows) / max(len(rows), 1)
    report["per_image"] = rows
    return report


def degrade(image: np.ndarray, rng: np.random.Generator, *, blur=(1.0, 2.0), noise=(10.0, 20.0),
            jpeg_quality=(30, 70), color_shift: float = 20.0) -> np.ndarray:
    """A uint8 copy with a random colour cast (+-color_shift per channel), gaussian blur (radius in `blur`),
    additive gaussian noise (sigma in `noise`) and JPEG compression (quality in `jpeg_quality`)."""
    img = np.asarray(image, np.float64) + rng.uniform(-color_shift, color_shift, size=3)
    pil = Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8))
    pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(*blur)))
    img = np.asarray(pil, np.float64) + rng.normal(0.0, rng.uniform(*noise), size=img.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8)).save(
        buffer, format="JPEG", quality=int(rng.integers(jpeg_quality[0], jpeg_quality[1] + 1)))
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))
