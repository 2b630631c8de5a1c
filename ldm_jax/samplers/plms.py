"""PLMS sampling: pseudo linear multistep (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on
Manifolds"), as one compiled loop.

Mirrors CompVis `ldm/models/diffusion/plms.py` (`PLMSSampler.plms_sampling` / `p_sample_plms`; eta must be 0).
It runs over the DDIM time steps tau (uniform by default) and replaces eps_theta in the deterministic DDIM
update (see `ddim.py`) by a multistep combination e' of the current and previous predictions:

    first step:  x' = DDIM(x, e), e_next = eps_theta(x', tau_{next}), e' = (e + e_next) / 2   (pseudo improved Euler)
    then         e' = (3 e - e_1) / 2                          (Adams-Bashforth 2)
                 e' = (23 e - 16 e_1 + 5 e_2) / 12              (AB3)
                 e' = (55 e - 59 e_1 + 37 e_2 - 9 e_3) / 24     (AB4)

where e_k is the raw eps_theta of k steps ago (the history stores e, not e'). The first step costs two U-Net
calls. The history is carried in the loop state; it starts empty at `start_step` (img2img).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ldm_jax.samplers.common import EpsFn, Known, Progress, blend_known, end_index, full_t, report, start_index
from ldm_jax.samplers.ddim import ddim_alphas, ddim_timesteps, ddim_update
from ldm_jax.schedules import Schedule


def plms_sample(
    eps_fn: EpsFn,
    x_T: jax.Array,
    schedule: Schedule,
    keys: jax.Array | None = None,
    *,
    steps: int,
    discretize: str = "uniform",
    start_step=0,
    end_step: int | None = None,
    progress: Progress = None,
    known: Known | None = None,
) -> jax.Array:
    """PLMS from x_T [B, h, w, C] (N(0, I), or `ddim_noise_to_start` for img2img) to x_0. Deterministic
    (`keys` is accepted for a uniform signature and unused). Loop step i evaluates tau_{n-i}; end_step (static)
    stops before that loop step (the history then ends with the run: a continuation starts a new one)."""
    del keys
    tau = ddim_timesteps(schedule.n_steps, steps, discretize)
    n = len(tau)
    alpha, alpha_prev = ddim_alphas(schedule, tau)
    tau = jnp.asarray(tau)
    start = start_index(start_step, n)

    def body(i, carry):
        x, e1, e2, e3 = carry  # e_k: eps_theta of k steps ago
        report(progress, i)
        index = n - 1 - i
        a, ap = alpha[index], alpha_prev[index]
        x = blend_known(known, x, jnp.sqrt(a), jnp.sqrt(1.0 - a))
        e = eps_fn(x, full_t(tau[index], x)).astype(jnp.float32)

        def improved_euler(_):
            x_next, _ = ddim_update(x, e, a, ap, 0.0, 0.0)
            t_next = tau[jnp.maximum(index - 1, 0)]  # CompVis: time_range[min(i + 1, n - 1)]
            e_next = eps_fn(x_next, full_t(t_next, x)).astype(jnp.float32)
            return (e + e_next) / 2

        branches = [
            improved_euler,
            lambda _: (3 * e - e1) / 2,
            lambda _: (23 * e - 16 * e1 + 5 * e2) / 12,
            lambda _: (55 * e - 59 * e1 + 37 * e2 - 9 * e3) / 24,
        ]
        order = jnp.minimum(i - start, 3)  # len(old_eps) in CompVis
        e_prime = lax.switch(order, branches, None)
        x, _ = ddim_update(x, e_prime, a, ap, 0.0, 0.0)
        return x, e, e1, e2

    x = x_T.astype(jnp.float32)
    zeros = jnp.zeros_like(x)
    return lax.fori_loop(start, end_index(end_step, n), body, (x, zeros, zeros, zeros))[0]
