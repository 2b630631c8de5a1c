"""Ancestral DDPM sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"), as one compiled loop.

Mirrors labml `labml_nn/diffusion/stable_diffusion/sampler/ddpm.py` (`DDPMSampler.p_sample`, temperature 1,
no clipping of x_0):

    x_0       = x_t / sqrt(alpha_bar_t) - sqrt(1 / alpha_bar_t - 1) eps_theta(x_t, t)
    mu_t      = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
                + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
    beta~_t   = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t,    log-variance clamped at 1e-20
    x_{t-1}   = mu_t + exp(log(beta~_t) / 2) z,   no noise at the last step (table index t = 0)

with alpha_bar_{-1} := 1. With S = T steps this is exactly labml (t = T-1, ..., 0). With S < T steps we run the
strided chain t_i = (S-1-i) * (T // S) (diffusers `DDPMScheduler`, "leading" spacing), replacing beta_t by the
effective beta = 1 - alpha_bar_t / alpha_bar_{t_prev} of the skipped block (identical to labml when S = T).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ldm_jax.samplers.common import (EpsFn, Known, Progress, blend_known, check_steps, end_index, full_t, report,
                                     start_index, step_noise)
from ldm_jax.schedules import Schedule, q_sample


def ddpm_timesteps(n_steps_train: int, steps: int) -> np.ndarray:
    """Table indices visited, in sampling order: (S-1)c, ..., c, 0 with c = T // S (all T..1 when S = T)."""
    check_steps(steps, n_steps_train)
    return (np.arange(steps - 1, -1, -1) * (n_steps_train // steps)).astype(np.int32)


def ddpm_coefficients(schedule: Schedule, steps: int) -> dict[str, jax.Array]:
    """Per loop step [S] float32 coefficients (labml `DDPMSampler.__init__`), indexed in sampling order."""
    ts = ddpm_timesteps(schedule.n_steps, steps)
    ab = schedule.alphas_cumprod[ts]  # alpha_bar_t
    prev = ts - schedule.n_steps // steps
    ab_prev = jnp.where(jnp.asarray(prev) >= 0, schedule.alphas_cumprod[np.maximum(prev, 0)], 1.0)
    if steps == schedule.n_steps:
        beta = schedule.betas[ts]  # labml uses the float32 betas themselves
    else:
        beta = 1.0 - ab / ab_prev  # effective beta of the skipped block
    variance = beta * (1.0 - ab_prev) / (1.0 - ab)
    return dict(
        t=jnp.asarray(ts),
        sqrt_recip_alpha_bar=ab**-0.5,
        sqrt_recip_m1_alpha_bar=jnp.sqrt(1.0 / ab - 1.0),
        mean_x0_coef=beta * jnp.sqrt(ab_prev) / (1.0 - ab),
        mean_xt_coef=(1.0 - ab_prev) * jnp.sqrt(1.0 - beta) / (1.0 - ab),
        log_var=jnp.log(jnp.clip(variance, 1e-20)),
    )


def ddpm_sample(
    eps_fn: EpsFn,
    x_T: jax.Array,
    schedule: Schedule,
    keys: jax.Array,
    *,
    steps: int | None = None,
    start_step=0,
    end_step: int | None = None,
    progress: Progress = None,
    known: Known | None = None,
) -> jax.Array:
    """Ancestral sampling from x_T [B, h, w, C] (N(0, I), or `ddpm_noise_to_start`) to x_0.

    steps defaults to T (labml's DDPMSampler). Loop step i evaluates eps_theta at ddpm_timesteps(...)[i] and
    draws its noise from (keys, i); steps i < start_step (traced) are skipped, and with end_step (static) the
    loop stops before that step.
    """
    if keys is None:
        raise ValueError("ddpm is stochastic: it needs keys (one per image)")
    steps = schedule.n_steps if steps is None else steps
    c = ddpm_coefficients(schedule, steps)

    def body(i, x):
        report(progress, i)
        t = c["t"][i]
        x = blend_known(known, x, schedule.sqrt_alphas_cumprod[t], schedule.sqrt_one_minus_alphas_cumprod[t])
        e_t = eps_fn(x, full_t(t, x)).astype(jnp.float32)
        x0 = c["sqrt_recip_alpha_bar"][i] * x - c["sqrt_recip_m1_alpha_bar"][i] * e_t
        mean = c["mean_x0_coef"][i] * x0 + c["mean_xt_coef"][i] * x
        noise = jnp.where(t == 0, 0.0, step_noise(keys, i, x))
        return mean + jnp.exp(0.5 * c["log_var"][i]) * noise

    return lax.fori_loop(start_index(start_step, steps), end_index(end_step, steps), body, x_T.astype(jnp.float32))


def ddpm_noise_to_start(schedule: Schedule, x0: jax.Array, noise: jax.Array, *, steps: int | None = None,
                        start_step) -> jax.Array:
    """img2img start for `ddpm_sample(..., start_step)`: q_sample at the first evaluated time step
    ddpm_timesteps(...)[start_step] (labml `DDPMSampler.q_sample(x0, t)`); x_0 when start_step >= S."""
    steps = schedule.n_steps if steps is None else steps
    ts = jnp.asarray(ddpm_timesteps(schedule.n_steps, steps))
    s = start_index(start_step, steps)
    xs = q_sample(schedule, x0, ts[jnp.minimum(s, steps - 1)], noise)
    return jnp.where(s >= steps, x0.astype(jnp.float32), xs)
