"""Euler ancestral sampling in sigma space (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"; k-diffusion, Crowson), as one compiled loop.

Mirrors k-diffusion `k_diffusion/sampling.py::sample_euler_ancestral` with `get_ancestral_step` and the
`external.DiscreteEpsDDPMDenoiser` wrapper (AUTOMATIC1111 "Euler a", diffusers `EulerAncestralDiscreteScheduler`).
With D_i = x_i - sigma_i eps_theta(x_i / sqrt(sigma_i^2 + 1), t_i):

    sigma_up   = min(sigma_{i+1}, eta sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2))
    sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2)
    x_{i+1}    = x_i + (x_i - D_i) / sigma_i (sigma_down - sigma_i) + sigma_up z_i    (no noise when sigma_{i+1} = 0)

eta = 1 by default (eta = 0 is the deterministic Euler method). Sigma grid: by default the schedule's sigmas
at S evenly spaced fractional time steps T-1 .. 0, log-linearly interpolated (the k-diffusion `get_sigmas(S)` /
A1111 "Euler a" / diffusers default; `common.schedule_sigmas`), the U-Net getting the rounded time step;
`karras=True` uses the Karras rho=7 grid instead.

Input convention as `dpm_solver.py`: unit-variance x_T, scaled by sigmas[0] = sigma_max inside; for img2img pass
`euler_ancestral_noise_to_start`. z_i for image b is normal(fold_in(keys[b], i)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ldm_jax.samplers.common import (EpsFn, Known, Progress, as_f32, blend_known, check_steps, end_index,
                                     k_denoise, k_noise_to_start, karras_sigmas, report, schedule_sigmas,
                                     start_index, step_noise)
from ldm_jax.schedules import Schedule


def euler_ancestral_sigmas(schedule: Schedule, steps: int, karras: bool = False) -> tuple[jax.Array, jax.Array]:
    """(sigmas [S+1] ending in 0, integer time steps t [S]) of the chosen grid."""
    check_steps(steps, schedule.n_steps)
    return karras_sigmas(schedule, steps) if karras else schedule_sigmas(schedule, steps)


def ancestral_step(sigma_from, sigma_to, eta):
    """(sigma_down, sigma_up) of k-diffusion `get_ancestral_step`."""
    sigma_up = jnp.minimum(sigma_to, eta * jnp.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    sigma_down = jnp.sqrt(sigma_to**2 - sigma_up**2)
    return sigma_down, sigma_up


def euler_ancestral_sample(
    eps_fn: EpsFn,
    x_T: jax.Array,
    schedule: Schedule,
    keys: jax.Array | None,
    *,
    steps: int,
    eta=1.0,
    karras: bool = False,
    start_step=0,
    end_step: int | None = None,
    progress: Progress = None,
    known: Known | None = None,
) -> jax.Array:
    """Euler ancestral from x_T [B, h, w, C] (unit variance) to x_0; eta and start_step are traced. With end_step
    (static) < steps the loop stops before that step and returns x / sigma_max (as `dpmpp_2m_sample`).
    keys=None means no noise (only meaningful for eta = 0, the plain Euler method)."""
    sigmas, ts = euler_ancestral_sigmas(schedule, steps, karras)
    eta = as_f32(eta)

    def body(i, x):
        report(progress, i)
        s, s_next = sigmas[i], sigmas[i + 1]
        x = blend_known(known, x, 1.0, s)  # x0 + sigma_i noise (sigma space)
        denoised = k_denoise(eps_fn, x, s, ts[i])
        sigma_down, sigma_up = ancestral_step(s, s_next, eta)
        d = (x - denoised) / s  # dx/dsigma of the probability-flow ODE
        x = x + d * (sigma_down - s)
        noise = step_noise(keys, i, x)
        return jnp.where(s_next > 0, x + noise * sigma_up, x)

    x = x_T.astype(jnp.float32) * sigmas[0]
    end = end_index(end_step, steps)
    x = lax.fori_loop(start_index(start_step, steps), end, body, x)
    return x if end == steps else x / sigmas[0]


def euler_ancestral_noise_to_start(schedule: Schedule, x0: jax.Array, noise: jax.Array, *, steps: int,
                                   start_step, karras: bool = False) -> jax.Array:
    """img2img input for `euler_ancestral_sample(..., start_step)` (x_0 + sigmas[start_step] noise, / sigma_max)."""
    return k_noise_to_start(euler_ancestral_sigmas(schedule, steps, karras)[0], x0, noise, start_step)
