"""DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models"), as one compiled loop.

Mirrors labml `labml_nn/diffusion/stable_diffusion/sampler/ddim.py` (`DDIMSampler`; itself CompVis
`ldm/models/diffusion/ddim.py`) with temperature 1 and repeat_noise False. In DDIM notation alpha is DDPM's
alpha_bar; tau_1 < ... < tau_S is a subsequence of the schedule indices and for i = S..1:

    pred_x0     = (x_{tau_i} - sqrt(1 - alpha_{tau_i}) eps_theta(x_{tau_i}, tau_i)) / sqrt(alpha_{tau_i})
    x_{tau_i-1} = sqrt(alpha_{tau_{i-1}}) pred_x0 + sqrt(1 - alpha_{tau_{i-1}} - sigma_{tau_i}^2) eps_theta
                  + sigma_{tau_i} z,
    sigma_{tau_i} = eta sqrt((1 - alpha_{tau_{i-1}}) / (1 - alpha_{tau_i})) sqrt(1 - alpha_{tau_i} / alpha_{tau_{i-1}}),

with alpha_{tau_0} := alpha_bar at table index 0 (CompVis/labml; not 1), so the result is x at t = 0 of the table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ldm_jax.samplers.common import (EpsFn, Known, Progress, as_f32, blend_known, check_steps, end_index, full_t,
                                     report, start_index, step_noise)
from ldm_jax.schedules import Schedule


def ddim_timesteps(n_steps_train: int, steps: int, discretize: str = "uniform") -> np.ndarray:
    """tau_1..tau_n (0-based table indices, increasing), exactly CompVis `make_ddim_timesteps` / labml.

    uniform: arange(0, T, T // S) + 1.  NB: when S does not divide T this has more than S entries
    (CompVis quirk kept for parity: S=30 -> 31 steps); `len()` of the result is the loop length.
    quad: (linspace(0, sqrt(0.8 T), S)^2).astype(int) + 1.
    """
    check_steps(steps, n_steps_train)
    if discretize == "uniform":
        tau = np.arange(0, n_steps_train, n_steps_train // steps) + 1
    elif discretize == "quad":
        tau = (np.linspace(0, np.sqrt(n_steps_train * 0.8), steps) ** 2).astype(int) + 1
    else:
        raise ValueError(f"unknown DDIM discretize {discretize!r}; choose 'uniform' or 'quad'")
    if tau[-1] >= n_steps_train:
        raise ValueError(f"{steps} DDIM/PLMS steps do not fit T={n_steps_train} with CompVis' {discretize!r} "
                         f"discretisation (its last time step would be {tau[-1]}, past the schedule); "
                         f"use another step count (at most {n_steps_train // 2})")
    return tau.astype(np.int32)


def ddim_alphas(schedule: Schedule, tau: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """(alpha_{tau_i}, alpha_{tau_{i-1}}) [n] float32, labml `ddim_alpha` / `ddim_alpha_prev`."""
    ab = schedule.alphas_cumprod
    alpha = ab[tau]
    alpha_prev = jnp.concatenate([ab[:1], ab[tau[:-1]]])
    return alpha, alpha_prev


def ddim_sigmas(alpha: jax.Array, alpha_prev: jax.Array, eta) -> jax.Array:
    """sigma_{tau_i} = eta sqrt((1 - a_prev) / (1 - a) (1 - a / a_prev))  [n]."""
    return as_f32(eta) * jnp.sqrt((1.0 - alpha_prev) / (1.0 - alpha) * (1.0 - alpha / alpha_prev))


def ddim_update(x, e_t, alpha, alpha_prev, sigma, noise):
    """One DDIM update x_{tau_i} -> x_{tau_{i-1}} given eps_theta (labml `get_x_prev_and_pred_x0`).

    Returns (x_prev, pred_x0), all [B, h, w, C]; alpha, alpha_prev, sigma are scalars.
    """
    pred_x0 = (x - jnp.sqrt(1.0 - alpha) * e_t) / jnp.sqrt(alpha)
    dir_xt = jnp.sqrt(1.0 - alpha_prev - sigma**2) * e_t  # direction pointing to x_t
    return jnp.sqrt(alpha_prev) * pred_x0 + dir_xt + sigma * noise, pred_x0


def ddim_sample(
    eps_fn: EpsFn,
    x_T: jax.Array,
    schedule: Schedule,
    keys: jax.Array,
    *,
    steps: int,
    eta=0.0,
    discretize: str = "uniform",
    start_step=0,
    end_step: int | None = None,
    progress: Progress = None,
    known: Known | None = None,
) -> jax.Array:
    """DDIM from x_T [B, h, w, C] (unit-variance noise, or `ddim_noise_to_start` for img2img) to x_0.

    Loop step i = 0..n-1 (n = len(ddim_timesteps(...))) evaluates eps_theta at tau_{n-i}; steps
    i < start_step are skipped (labml `paint(x, cond, t_start=n - start_step)`). eta and start_step are traced;
    end_step (static) stops before loop step end_step and returns x_{tau_{n-end_step}}.
    keys: typed key array [B]; the noise of step i is drawn only from (keys, i). keys=None means no noise
    (only meaningful for eta = 0). known: optional mask-blend inpainting (see `Known`).
    """
    tau = ddim_timesteps(schedule.n_steps, steps, discretize)
    n = len(tau)
    alpha, alpha_prev = ddim_alphas(schedule, tau)
    sigma = ddim_sigmas(alpha, alpha_prev, eta)
    tau = jnp.asarray(tau)

    def body(i, x):
        report(progress, i)
        index = n - 1 - i  # position of tau in the increasing list
        x = blend_known(known, x, jnp.sqrt(alpha[index]), jnp.sqrt(1.0 - alpha[index]))
        e_t = eps_fn(x, full_t(tau[index], x)).astype(jnp.float32)
        noise = step_noise(keys, i, x)
        x, _ = ddim_update(x, e_t, alpha[index], alpha_prev[index], sigma[index], noise)
        return x

    return lax.fori_loop(start_index(start_step, n), end_index(end_step, n), body, x_T.astype(jnp.float32))


def ddim_q_sample(schedule: Schedule, x0: jax.Array, index, noise: jax.Array, *, steps: int,
                  discretize: str = "uniform") -> jax.Array:
    """labml `DDIMSampler.q_sample`: sqrt(alpha_{tau_index}) x_0 + sqrt(1 - alpha_{tau_index}) noise.

    index is the 0-based position in the increasing tau list (traced allowed; clipped to [0, n-1]).
    """
    tau = jnp.asarray(ddim_timesteps(schedule.n_steps, steps, discretize))
    t = tau[jnp.clip(jnp.asarray(index, jnp.int32), 0, tau.shape[0] - 1)]
    a = schedule.alphas_cumprod[t]
    return jnp.sqrt(a) * x0.astype(jnp.float32) + jnp.sqrt(1.0 - a) * noise.astype(jnp.float32)


def ddim_noise_to_start(schedule: Schedule, x0: jax.Array, noise: jax.Array, *, steps: int, start_step,
                        discretize: str = "uniform") -> jax.Array:
    """img2img start point for `ddim_sample(..., start_step)` (also PLMS): x_0 noised to the time step that the
    first executed loop step evaluates, tau_{n - start_step} (ddim index n-1-start_step), as diffusers does.

    CompVis/labml img2img scripts call q_sample(orig, index=t_enc) and then paint from index t_enc - 1, i.e. they
    noise one DDIM step *more* than the first evaluated time step (and fail at strength 1); we do not copy that.
    For start_step >= n (strength 0) this returns x_0.
    """
    n = len(ddim_timesteps(schedule.n_steps, steps, discretize))
    s = start_index(start_step, n)
    xs = ddim_q_sample(schedule, x0, n - 1 - s, noise, steps=steps, discretize=discretize)
    return jnp.where(s >= n, x0.astype(jnp.float32), xs)
