"""One training example from an image file: decoding, resizing, cropping, flipping, and the sizes SDXL is conditioned
on (`train.data` turns folders of them into batches).

Preprocessing follows diffusers' `examples/text_to_image/train_text_to_image(_flax).py`: `Resize(resolution,
BILINEAR)` of the shorter side (PIL's bilinear filter is antialiased when downscaling; the long side is truncated as
torchvision does), `CenterCrop` (or `RandomCrop`), optional `RandomHorizontalFlip`, then `Normalize([0.5], [0.5])`,
i.e. `x / 127.5 - 1`. Images are made RGB first: EXIF orientation applied, transparency composited on white, 16-bit
grayscale scaled to 8 bits. Each row also records the decoded image's size and the crop's top-left offset in the
resized image, SDXL's size and crop conditioning (Podell et al. 2023, sec. 2.2; diffusers'
`train_text_to_image_sdxl.py` records the same, except that after a flip it stores the cropped width minus `left`
where we store the mirrored crop's own left offset, `mirrored_left`).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

RESAMPLE = Image.Resampling.BILINEAR  # as diffusers' train_text_to_image


class UnreadableImage(Exception):
    """PIL could not decode an image file (corrupt, truncated, not an image)."""


class SmallImageWarning(UserWarning):
    """An image smaller than the training resolution was upscaled."""


def _decode_rgb(path: str) -> Image.Image:
    """Open, apply EXIF orientation and convert to RGB (transparency on white); UnreadableImage on any failure."""
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I;16"):  # 16-bit grayscale: PIL's convert() would clip instead of scale
            img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257.0).round().astype(np.uint8), "L")
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return img.convert("RGB")
    except Exception as e:  # PIL raises many types (OSError, ValueError, SyntaxError, DecompressionBombError...)
        raise UnreadableImage(f"{path}: {type(e).__name__}: {e}") from e


class Example(NamedTuple):
    """One decoded training image: pixels f32 [res, res, 3] in [-1, 1], the decoded image's (width, height) before
    resizing, and where the crop starts in the resized image, (top, left), as SDXL's crop conditioning counts it
    (a flipped crop's `left` is the mirrored crop's, `mirrored_left`)."""

    pixels: np.ndarray
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    resized_size: tuple[int, int]  # (width, height) of the resized image the crop was taken from


def mirrored_left(left: int, resized_width: int, resolution: int) -> int:
    """The left offset of a crop [left, left + resolution) after the resized image is flipped horizontally."""
    return resized_width - left - resolution


def read_example(path, resolution, center_crop: bool, random_flip: bool, rng) -> Example:
    """`load_example` without the warning (the batch iterator counts upscaled images itself). `resolution`: the side
    of the square crop, or a (width, height) bucket (`train.buckets`): the image is resized to cover it, then cropped.
    """
    bw, bh = crop_size(resolution)
    img = _decode_rgb(path)
    original_size = img.size
    w, h = img.size
    # Cover (bw, bh) keeping the aspect ratio; for a square this is torchvision's Resize(int): the shorter side ->
    # resolution, the longer side truncated.
    size = (bw, max(bh, int(bw * h / w))) if bw / w >= bh / h else (max(bw, int(bh * w / h)), bh)
    if size != (w, h):
        img = img.resize(size, RESAMPLE)
        w, h = img.size
    if rng is None and (random_flip or not center_crop):
        rng = np.random.default_rng()
    if center_crop:  # torchvision CenterCrop rounding
        left, top = int(round((w - bw) / 2.0)), int(round((h - bh) / 2.0))
    else:
        top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    pixels = np.asarray(img.crop((left, top, left + bw, top + bh)), dtype=np.float32)
    if random_flip and rng.random() < 0.5:
        pixels, left = pixels[:, ::-1], mirrored_left(left, w, bw)
    return Example(np.ascontiguousarray(pixels / 127.5 - 1.0), original_size, (top, left), (w, h))


def crop_size(resolution) -> tuple[int, int]:
    """(width, height) of the crop: a square side or a (width, height) bucket."""
    return (int(resolution), int(resolution)) if np.ndim(resolution) == 0 else tuple(int(v) for v in resolution)


def upscale_warning(path, original_size: tuple[int, int], resolution) -> str | None:
    """The warning for an image (width, height) smaller than its crop (so upscaled), else None."""
    (w, h), (bw, bh) = original_size, crop_size(resolution)
    if w >= bw and h >= bh:
        return None
    target = f"resolution {bw}" if np.ndim(resolution) == 0 else f"its bucket {bw}x{bh}"
    return f"{path}: {w}x{h} is smaller than {target}; upscaled"


def load_example(path, resolution: int, *, center_crop: bool = True, random_flip: bool = False,
                 rng: np.random.Generator | None = None) -> Example:
    """The image as a training example: pixels float32 [resolution, resolution, 3] in [-1, 1], its sizes and crop;
    `rng` drives the random crop and flip (fresh if None).

    Raises UnreadableImage if PIL cannot decode the file; warns (SmallImageWarning) when the image is upscaled.
    """
    ex = read_example(path, resolution, center_crop, random_flip, rng)
    message = upscale_warning(path, ex.original_size, resolution)
    if message:
        warnings.warn(message, SmallImageWarning)
    return ex


def load_image(path, resolution: int, *, center_crop: bool = True, random_flip: bool = False,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """`load_example(...).pixels`: float32 [resolution, resolution, 3] in [-1, 1]."""
    return load_example(path, resolution, center_crop=center_crop, random_flip=random_flip, rng=rng).pixels
