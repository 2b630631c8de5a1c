"""DPM-Solver++(2M) with Karras sigmas (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models"; Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"), as one compiled loop.

Mirrors k-diffusion `k_diffusion/sampling.py::sample_dpmpp_2m` over `get_sigmas_karras(S, sigma_min, sigma_max,
rho=7)` with the `external.DiscreteEpsDDPMDenoiser` wrapper ("DPM++ 2M Karras"). In sigma space
(x = x_0 + sigma eps, lambda = -log sigma, h_i = lambda_{i+1} - lambda_i), with the data prediction
D_i = x_i - sigma_i eps_theta(x_i / sqrt(sigma_i^2 + 1), t(sigma_i)):

    first step / last step (sigma_{i+1} = 0):  x_{i+1} = (sigma_{i+1} / sigma_i) x_i - expm1(-h_i) D_i
    otherwise, r = h_{i-1} / h_i:              D'    = (1 + 1 / (2 r)) D_i - 1 / (2 r) D_{i-1}
                                               x_{i+1} = (sigma_{i+1} / sigma_i) x_i - expm1(-h_i) D'

The last step (to sigma = 0) returns D exactly. Deterministic.

Input convention: the caller passes unit-variance x_T and the sampler scales it by sigmas[0] = sigma_max
(k-diffusion's `x = noise * sigmas[0]`); for img2img pass `dpmpp_2m_noise_to_start` (x_0 + sigma_s noise, divided
by sigma_max). The result is x_0 (sigma = 0), directly comparable to the DDIM/PLMS outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ldm_jax.samplers.common import (EpsFn, Known, Progress, blend_known, check_steps, end_index, k_denoise,
                                     k_noise_to_start, karras_sigmas, report, start_index)
from ldm_jax.schedules import Schedule


def dpmpp_2m_sample(
    eps_fn: EpsFn,
    x_T: jax.Array,
    schedule: Schedule,
    keys: jax.Array | None = None,
    *,
    steps: int,
    start_step=0,
    end_step: int | None = None,
    rho: float = 7.0,
    progress: Progress = None,
    known: Known | None = None,
) -> jax.Array:
    """DPM-Solver++(2M) on the Karras grid from x_T [B, h, w, C] (unit variance) to x_0. `keys` is unused
    (deterministic; kept for a uniform signature). Loop step i goes sigmas[i] -> sigmas[i+1]; the
    multistep history starts empty at `start_step` (traced), as k-diffusion does on a sliced sigma list. With
    end_step (static) < steps the loop stops before that step and returns x / sigma_max (sigma space, in the input
    convention of a run continued from start_step = end_step)."""
    del keys
    check_steps(steps, schedule.n_steps)
    sigmas, ts = karras_sigmas(schedule, steps, rho)
    start = start_index(start_step, steps)
    lam = lambda s: -jnp.log(s)  # noqa: E731  lambda = -log sigma  (k-diffusion t_fn)

    def body(i, carry):
        x, old_denoised = carry
        report(progress, i)
        s, s_next, s_prev = sigmas[i], sigmas[i + 1], sigmas[jnp.maximum(i - 1, 0)]
        x = blend_known(known, x, 1.0, s)  # x0 + sigma_i noise (sigma space)
        denoised = k_denoise(eps_fn, x, s, ts[i])
        last = s_next == 0
        s_next_safe = jnp.where(last, 1.0, s_next)  # keeps the unused branch finite
        h = lam(s_next_safe) - lam(s)
        h_last = lam(s) - lam(s_prev)
        first = i == start
        r = jnp.where(first, 1.0, h_last) / h
        d = jnp.where(first, denoised, (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised)
        x_next = (jnp.exp(-lam(s_next_safe)) / jnp.exp(-lam(s))) * x - jnp.expm1(-h) * d
        return jnp.where(last, denoised, x_next), denoised

    x = x_T.astype(jnp.float32) * sigmas[0]
    end = end_index(end_step, steps)
    x = lax.fori_loop(start, end, body, (x, jnp.zeros_like(x)))[0]
    return x if end == steps else x / sigmas[0]


def dpmpp_2m_noise_to_start(schedule: Schedule, x0: jax.Array, noise: jax.Array, *, steps: int, start_step,
                            rho: float = 7.0) -> jax.Array:
    """img2img input for `dpmpp_2m_sample(..., start_step)`: x = x_0 + sigmas[start_step] noise in sigma space,
    divided by sigma_max (the sampler multiplies it back)."""
    check_steps(steps, schedule.n_steps)
    return k_noise_to_start(karras_sigmas(schedule, steps, rho)[0], x0, noise, start_step)
