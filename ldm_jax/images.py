"""Image helpers for the pipelines and the CLI: arrays <-> [-1, 1], reading images and masks, PNG output
with generation parameters in text chunks (as A1111 / diffusers users expect), image grids, and PSNR."""

from __future__ import annotations

import os
import tempfile

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from ldm_jax.errors import UserError


def to_unit_range(images) -> np.ndarray:
    """uint8 [.., H, W, 3] in [0, 255] or float in [-1, 1] -> float32 in [-1, 1]."""
    a = np.asarray(images)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 127.5 - 1.0
    return a.astype(np.float32)


def to_uint8(images) -> np.ndarray:
    """float in [-1, 1] -> uint8 in [0, 255] (rounded, as diffusers)."""
    a = np.asarray(images, np.float32)
    return np.clip(np.round((a + 1.0) * 127.5), 0, 255).astype(np.uint8)


def read_image(path: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image file -> uint8 [H, W, 3] (EXIF orientation applied, alpha composited on white), optionally
    resized to size=(height, width)."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            im = im.convert("RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.LANCZOS)
            return np.asarray(im, np.uint8)
    except FileNotFoundError:
        raise UserError(f"{path}: no such image file") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: cannot read image ({e})") from None


def read_mask(path: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask image -> float32 [H, W] in [0, 1]; white (1) marks the region to repaint."""
    rgb = read_image(path, size)
    return rgb.astype(np.float32).mean(axis=-1) / 255.0


def png_info(params: dict) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for k, v in params.items():
        if v is not None:
            info.add_text(str(k), str(v))
    return info


def save_png(path: str, image: np.ndarray, params: dict | None = None) -> None:
    """Write a PNG atomically (temporary file + rename), with `params` as tEXt chunks."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(np.asarray(image, np.uint8)).save(f, format="PNG", pnginfo=png_info(params or {}))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """[N, H, W, 3] -> one [rows * H, cols * W, 3] image (row-major, blank cells black)."""
    n, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    out = np.zeros((rows * h, cols * w, c), images.dtype)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        out[r * h:(r + 1) * h, q * w:(q + 1) * w] = im
    return out


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio of two uint8 images (or batches), in dB: 10 log10(255^2 / MSE); inf if equal."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
