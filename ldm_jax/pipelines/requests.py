"""What a txt2img / img2img / inpaint request may ask for, checked before anything compiles (`generate`): prompts,
steps, sizes, strength, masks, latents and SDXL's base/refiner hand-over; each problem is one UserError line."""

from __future__ import annotations

import os

import numpy as np

from ldm_jax import samplers
from ldm_jax.errors import UserError
from ldm_jax.images import pil_masks_to_array

OUTPUTS = ("images", "latents")


def as_list(prompts, what: str) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, np.ndarray):
        prompts = prompts.reshape(-1).tolist()
    try:
        prompts = list(prompts)
    except TypeError:
        raise UserError(f"{what}: expected a string or a list of strings, got {type(prompts).__name__}") from None
    if not prompts:
        raise UserError(f"{what}: the list of prompts is empty")
    if not all(isinstance(p, str) for p in prompts):
        raise UserError(f"{what}: prompts must be strings")
    return prompts


def check_steps(steps) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise UserError(f"steps must be an integer >= 1, got {steps!r}")


def check_strength(strength) -> None:
    _check_finite("strength", strength)
    if not 0.0 <= float(strength) <= 1.0:
        raise UserError(f"strength must be in [0, 1], got {strength}")


def _check_finite(name: str, value) -> None:
    if isinstance(value, (str, bytes, bool)):
        raise UserError(f"{name} must be a number, got {value!r}")
    try:
        ok = np.isfinite(float(value))
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not ok:
        raise UserError(f"{name} must be a finite number, got {value}")


def check_common(sd, sampler, steps, output, eta, guidance_scale):
    _check_finite("guidance_scale", guidance_scale)
    if not isinstance(sampler, str):
        raise UserError(f"sampler must be a name ({', '.join(samplers.SAMPLERS)}), got {sampler!r}")
    if eta is not None:
        _check_finite("eta", eta)
    if sampler not in samplers.SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; choose from {', '.join(samplers.SAMPLERS)}")
    check_steps(steps)
    if steps > sd.config.schedule.n_steps:
        raise UserError(f"steps must be <= {sd.config.schedule.n_steps}, got {steps}")
    try:  # the sampler's own time-step table: e.g. DDIM's CompVis discretisation cannot do 3 steps of T=1000
        samplers.n_loop_steps(sampler, sd.config.schedule.n_steps, int(steps))
    except ValueError as e:
        raise UserError(str(e)) from None
    if output not in OUTPUTS:
        raise UserError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    if eta is not None and sampler in samplers.NO_ETA and float(eta) != 0.0:
        raise UserError(f"sampler {sampler!r} has no eta; leave it unset (got {eta})")
    if eta is not None and float(eta) < 0:
        raise UserError(f"eta must be >= 0, got {eta}")


def check_size(height, width, factor: int = 8) -> None:
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < factor or v % 8 or v % factor:
            raise UserError(f"{name} must be a positive multiple of {max(8, factor)}, got {v!r}")


def broadcast_rows(a: np.ndarray, n: int, what: str) -> np.ndarray:
    """[H, W, C] or [1 | n, H, W, C] -> [n, H, W, C]."""
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[0] not in (1, n):
        raise UserError(f"{what}: expected [H, W, C] or [{n}, H, W, C], got shape {a.shape}")
    return np.broadcast_to(a, (n,) + a.shape[1:])


def mask_rows(masks, n: int, hw: tuple[int, int]) -> np.ndarray:
    """[H, W], [H, W, 1], [B, H, W] or [B, H, W, 1]; uint8 0..255 or float 0..1; or PIL images of any mode (read as
    mask files are) -> float [n, H, W, 1]."""
    if masks is None:
        raise UserError("inpaint needs a mask")
    if isinstance(masks, (str, os.PathLike)):
        raise UserError(f"masks are arrays or PIL images, got the path {os.fspath(masks)!r}: read it with "
                        "ldm_jax.images.read_mask(path)")
    raw = np.asarray(pil_masks_to_array(masks))
    if raw.dtype == np.uint8 and raw.size and raw.max() == 1:
        raise UserError("mask: a uint8 mask holds 0..255 (white = repaint) but this one only 0 and 1; pass it as "
                        "float 0..1 or scale it by 255")
    m = raw.astype(np.float32) / (255.0 if raw.dtype == np.uint8 else 1.0)
    if m.ndim in (3, 4) and m.shape[-1] == 3 and m.shape[-3:-1] == tuple(hw):  # RGB: the mean, as the CLI reads
        m = m.mean(axis=-1)
    if m.ndim == 2 or (m.ndim == 3 and m.shape[-1] == 1 and m.shape[:2] == tuple(hw)):
        m = m.reshape(m.shape[:2] + (1,))
    elif m.ndim == 3:
        m = m[..., None]
    m = broadcast_rows(m, n, "mask")
    if m.shape[1:3] != tuple(hw):
        raise UserError(f"the mask is {m.shape[2]}x{m.shape[1]} (width x height) but the image is {hw[1]}x{hw[0]}")
    if not np.isfinite(m).all() or m.min() < 0 or m.max() > 1:
        raise UserError("mask values must be finite and in [0, 1] (or uint8 0..255)")
    return m


def handover(sd, mode: str, sampler: str, steps: int, given_latents: bool, denoising_start, denoising_end):
    """(start, end) loop steps of SDXL's base/refiner hand-over (`samplers.handover_step`): start 0 and end None
    when neither fraction is given. denoising_end: this model stops there and returns the state (output
    "latents"); denoising_start: it goes on from there, from the state given as `latents`."""
    if denoising_start is None and denoising_end is None:
        return 0, None
    if mode != "txt2img":
        raise UserError(f"denoising_start / denoising_end split one txt2img run between two models (SDXL's base "
                        f"and refiner); {mode} takes strength instead")
    for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if value is not None:
            _check_finite(name, value)
            if not 0.0 < float(value) < 1.0:
                raise UserError(f"{name} must be in (0, 1), got {value}")
    if denoising_start is not None and not given_latents:
        raise UserError("denoising_start goes on from the latents another model handed over: pass them as latents= "
                        "(the output=\"latents\" of a run with denoising_end)")
    if None not in (denoising_start, denoising_end) and float(denoising_end) <= float(denoising_start):
        raise UserError(f"denoising_end ({denoising_end}) must be past denoising_start ({denoising_start})")
    split = lambda f: samplers.handover_step(sampler, sd.config.schedule, steps, f)  # noqa: E731
    return (0 if denoising_start is None else split(denoising_start),
            None if denoising_end is None else split(denoising_end))


def check_aesthetic_scores(config, scores) -> tuple[float, float]:
    """(prompt, negative prompt) aesthetic scores of the SDXL refiner's y, as two finite floats; refused for other
    models (their y has no score)."""
    if not config.is_sdxl_refiner:
        raise UserError(f"aesthetic scores are for the SDXL refiner (its conditioning has one); {config.name} has none")
    try:
        score, negative = scores
    except (TypeError, ValueError):
        raise UserError(f"aesthetic_scores: expected (prompt score, negative prompt score), got {scores!r}") from None
    for name, value in (("aesthetic score", score), ("negative aesthetic score", negative)):
        _check_finite(name, value)
    return float(score), float(negative)
