"""Image helpers for the pipelines and the CLI: arrays <-> [-1, 1], reading images and masks, PNG output
with generation parameters in text chunks (as A1111 / diffusers users expect), image grids, and PSNR."""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import warnings

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from ldm_jax.errors import UserError


def to_unit_range(images) -> np.ndarray:
    """uint8 [.., H, W, 3] in [0, 255] or float in [-1, 1] (a PIL image, an array or nested lists) -> float32 in
    [-1, 1]. A PIL image (or a list of them) of any mode is read as files are (`read_image`: 16-bit and float
    grayscale scaled, transparency on white). Anything else (other integer types, floats outside [-1, 1], NaN,
    not 3 channels) is a UserError: a float image in [0, 1] or [0, 255] would otherwise be read as a much
    brighter one."""
    if isinstance(images, (str, os.PathLike)):
        raise UserError(f"init images are arrays or PIL images, got the path {os.fspath(images)!r}: read it with "
                        "ldm_jax.images.read_image(path)")
    if isinstance(images, Image.Image):
        images = _to_rgb(images, WHITE)
    elif isinstance(images, (list, tuple)) and images and all(isinstance(i, Image.Image) for i in images):
        images = [np.asarray(_to_rgb(i, WHITE)) for i in images]
        if len({i.shape for i in images}) > 1:
            raise UserError(f"the init images must all have one size, got {sorted({i.shape[:2] for i in images})} "
                            "(height, width)")
    a = np.asarray(images)
    if a.ndim < 3 or a.shape[-1] != 3:
        raise UserError(f"images must be RGB, [H, W, 3] or [B, H, W, 3], got shape {a.shape} (convert RGBA or "
                        "grayscale images to RGB first)")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 127.5 - 1.0
    if not np.issubdtype(a.dtype, np.floating):
        raise UserError(f"images must be uint8 (0..255) or float in [-1, 1], got {a.dtype}")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise UserError("float images must be finite and in [-1, 1], got NaN or Inf values")
    if a.min(initial=0.0) < -1.0 - 1e-3 or a.max(initial=0.0) > 1.0 + 1e-3:
        raise UserError(f"float images must be finite and in [-1, 1], got values in [{a.min():.3g}, "
                        f"{a.max():.3g}] (uint8 images in 0..255 are scaled; for floats in [0, 1] pass x * 2 - 1)")
    if a.size and a.min() >= 0.0 and a.max() > 0.0:  # a [-1, 1] image with no pixel darker than mid-gray: rare
        warnings.warn("the float init image has no negative value, so it is read as a light image in [-1, 1]; if it "
                      "holds 0..1 values, pass x * 2 - 1", stacklevel=3)
    return np.clip(a, -1.0, 1.0)


def to_uint8(images) -> np.ndarray:
    """float in [-1, 1] -> uint8 in [0, 255] (rounded, as diffusers)."""
    a = np.asarray(images, np.float32)
    return np.clip(np.round((a + 1.0) * 127.5), 0, 255).astype(np.uint8)


# PIL modes of 16-bit (and 32-bit integer) grayscale: 16-bit PNGs and TIFFs open as one of these
_WIDE_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def _to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any PIL image -> RGB: 16-bit grayscale scaled to 8 bits (0..65535 -> 0..255; PIL's own convert clips
    it at 255, turning a photo near white), 32-bit float grayscale (mode F, float TIFFs) in [0, 1] scaled to
    0..255 (PIL's convert reads floats as 0..255, turning it black; floats beyond 1 keep that reading),
    transparency composited onto `background`."""
    if im.mode in _WIDE_GRAY:
        a = np.clip(np.asarray(im).astype(np.float64), 0, 65535) / 257.0
        im = Image.fromarray(np.round(a).astype(np.uint8))  # 2-D uint8: mode L
    elif im.mode == "F":
        a = np.asarray(im).astype(np.float64)
        if not np.isfinite(a).all():
            raise UserError("the float image holds NaN or Inf values")
        scale = 255.0 if a.size and a.min() >= 0.0 and a.max() <= 1.0 else 1.0
        im = Image.fromarray(np.round(np.clip(a * scale, 0, 255)).astype(np.uint8))
    if "A" in im.mode or "a" in im.mode or im.mode == "P" or "transparency" in im.info:
        im = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, background + (255,)), im)
    return im.convert("RGB")


def _too_large(path: str, e: Exception) -> UserError:
    """PIL's decompression-bomb check (over Image.MAX_IMAGE_PIXELS, ~89M, it warns; over twice that it refuses)
    as one line: such an image would not fit in memory as a diffusion model's input anyway."""
    found = re.search(r"\((\d+) pixels\)", str(e))
    size = f"{int(found.group(1)) / 1e6:.0f}M pixels" if found else "too many pixels"
    limit = Image.MAX_IMAGE_PIXELS or 0
    return UserError(f"{path}: the image has {size}, over PIL's limit of {limit / 1e6:.0f}M pixels (a guard against "
                     "decompression bombs) and far beyond what img2img and inpaint can hold in memory; resize it")


def read_image(path: str, size: tuple[int, int] | None = None, background: tuple[int, int, int] = WHITE) -> np.ndarray:
    """An image file -> uint8 [H, W, 3] (the first frame of an animation; EXIF orientation applied, 16-bit
    grayscale scaled to 8 bits, float grayscale in [0, 1] to 0..255, transparency composited onto `background`,
    white by default), optionally resized to size=(height, width). Images over PIL's decompression-bomb warning
    limit (Image.MAX_IMAGE_PIXELS) are refused before they are decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im = _to_rgb(ImageOps.exif_transpose(im), background)
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.Resampling.LANCZOS)
                return np.asarray(im, np.uint8)
    except FileNotFoundError:
        raise UserError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not an image file") from None
    except UnidentifiedImageError:
        raise UserError(f"{path}: not an image file (or not a format PIL can read)") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise _too_large(path, e) from None
    except UserError as e:
        raise UserError(f"{path}: cannot read image ({e})") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read image ({e})") from None


def read_mask(path: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask image -> float32 [H, W] in [0, 1]: the mean of R, G and B; white (1) marks the region to repaint,
    black (0) the region to keep. Transparency is composited onto black, so transparent areas are kept (a white
    brush stroke on a transparent layer repaints under the stroke only)."""
    return _mask_values(read_image(path, size, background=BLACK))


def _mask_values(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float32).mean(axis=-1) / 255.0


def pil_masks_to_array(masks):
    """A PIL mask image (or a list of them) of any mode -> float32 [H, W] (or [B, H, W]) in [0, 1], read as
    `read_mask` reads files; anything else is returned unchanged."""
    if isinstance(masks, Image.Image):
        return _mask_values(np.asarray(_to_rgb(masks, BLACK)))
    if isinstance(masks, (list, tuple)) and masks and all(isinstance(m, Image.Image) for m in masks):
        rows = [_mask_values(np.asarray(_to_rgb(m, BLACK))) for m in masks]
        if len({r.shape for r in rows}) > 1:
            raise UserError(f"the masks must all have one size, got {sorted({r.shape for r in rows})} (height, width)")
        return np.stack(rows)
    return masks


def png_info(params: dict) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for k, v in params.items():
        if v is not None:
            info.add_text(str(k), str(v))
    return info


def _new_temp(directory: str) -> tuple[int, str]:
    """A new, empty temporary file in `directory`, opened for writing: (fd, path). Created exclusively with mode
    0o666 so the umask applies as for any new file (mkstemp's 0600 would survive the rename)."""
    for _ in range(100):
        path = os.path.join(directory, f".tmp-{secrets.token_hex(8)}.png")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"{directory}: cannot find a free temporary file name")


def _write_temp(directory: str, image: np.ndarray, params: dict | None) -> str:
    """Encode a PNG (with `params` as tEXt chunks) into a new temporary file in `directory`; returns its path."""
    fd, tmp = _new_temp(directory)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(np.asarray(image, np.uint8)).save(f, format="PNG", pnginfo=png_info(params or {}))
    except OSError as e:  # e.g. a full disk: name the folder (the error from the open file names nothing)
        os.unlink(tmp)
        raise OSError(e.errno, e.strerror, e.filename or directory) from None
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _claim(tmp: str, path: str) -> bool:
    """Give the complete file `tmp` (kept) the new name `path`, atomically and only if `path` does not exist:
    False if it does. An existing file is never replaced (os.link fails on an existing name, rename would not)."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:  # a file system without hard links: reserve the name exclusively, then fill it atomically
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except FileExistsError:
        return False
    fd, copy = _new_temp(os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f, open(tmp, "rb") as src:
            shutil.copyfileobj(src, f)
        os.replace(copy, path)
    except BaseException:
        _unlink_quietly(copy)
        _unlink_quietly(path)
        raise
    return True


def save_png(path: str, image: np.ndarray, params: dict | None = None) -> None:
    """Write a PNG atomically (temporary file + rename, replacing `path` if it exists), with `params` as tEXt
    chunks, mode 0o666 & ~umask."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = _write_temp(directory, image, params)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def run_file_name(stem: str, run: int) -> str:
    """The file name of `stem` in run number `run`: run 1 is stem.png, later runs stem-2.png, stem-3.png, ..."""
    return f"{stem}.png" if run <= 1 else f"{stem}-{run}.png"


def first_free_run(directory: str, stems: list[str], start: int = 1) -> int:
    """The smallest run number >= start for which none of `stems` names an existing file in `directory`."""
    run = max(1, start)
    while any(os.path.lexists(os.path.join(directory, run_file_name(s, run))) for s in stems):
        run += 1
    return run


def save_new_pngs(directory: str, items: list[tuple[str, np.ndarray, dict | None]], run: int = 1) -> list[str]:
    """Save (stem, image, params) items as new PNGs in `directory`, never replacing a file: all of them under
    one run number (`run_file_name`), the first >= `run` for which every name is free (a multi-host run passes
    the number process 0 found free for the whole run's stems). Each file is written whole to a temporary file
    first and then linked to its name, which fails if the name exists (a concurrent run took it): then the files
    already linked are removed and the next free run number is tried. Returns the paths. An interrupted call
    leaves none of its files."""
    names = [stem for stem, _, _ in items]
    run = first_free_run(directory, names, run)
    temps, done = [], []
    try:
        for _, image, params in items:
            temps.append(_write_temp(directory, image, params))
        while True:
            done = []
            for stem, tmp in zip(names, temps):
                path = os.path.join(directory, run_file_name(stem, run))
                if not _claim(tmp, path):
                    break
                done.append(path)
            else:
                return done
            for path in done:
                os.unlink(path)
            done = []
            run = first_free_run(directory, names, run + 1)
    except BaseException:  # an error or Ctrl-C while linking: no part of a run is left
        for path in done:
            _unlink_quietly(path)
        raise
    finally:
        for tmp in temps:
            _unlink_quietly(tmp)


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
