"""Shared pieces of the samplers: per-image noise, loop bounds, progress, and k-diffusion sigma grids.

Conventions used by every sampler in this package:

- `eps_fn(x, t) -> eps_theta(x, t)`: x [B, h, w, C] float32 in the variance-preserving space of DDPM
  (x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps), t int32 [B] a 0-based schedule index.
  Classifier-free guidance is the caller's business, inside eps_fn.
- Randomness: `keys` is a typed key array [B], one key per image (`fold_in(seed_key, global_image_index)`).
  The noise of loop step i (its index in the full S-step schedule, so img2img reuses the txt2img draws) is
  `normal(fold_in(keys[b], i), x.shape[1:])`, so a result does not depend on the batch split or device count.
- `start_step` (img2img) is traced: the loop is `fori_loop(start_step, n, ...)`; `eta` is traced too.

k-diffusion grids (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models";
crowsonkb/k-diffusion `sampling.get_sigmas_karras`, `external.DiscreteSchedule.get_sigmas`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.schedules import Schedule, sigma_to_t, t_to_sigma

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]
Progress = Callable[[int], None] | None


class Known(NamedTuple):
    """Mask-blend inpainting with a non-inpainting U-Net (CompVis `ddim_sampling(mask=..., x0=...)`): at the start
    of every executed loop step, x = keep * x0_noised + (1 - keep) * x, where x0_noised is x0 brought to that
    step's noise level with the fixed `noise` (q_sample in VP space; x0 + sigma noise in sigma space).
    x0, noise [B, h, w, C]; keep [B, h, w, 1] or [B, h, w, C], 1 = keep the original. The caller pastes x0 into
    the kept region of the final result (the last level is not 0 for DDIM/PLMS)."""

    x0: jax.Array
    keep: jax.Array
    noise: jax.Array


def blend_known(known: Known | None, x: jax.Array, scale_x0, scale_noise) -> jax.Array:
    """keep * (scale_x0 x0 + scale_noise noise) + (1 - keep) * x (identity if known is None)."""
    if known is None:
        return x
    target = scale_x0 * known.x0.astype(jnp.float32) + scale_noise * known.noise.astype(jnp.float32)
    keep = known.keep.astype(jnp.float32)
    return keep * target + (1.0 - keep) * x


def check_steps(steps, n_steps_train: int | None = None) -> int:
    """`steps` must be a static Python int in [1, T]."""
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise ValueError(f"steps must be a Python int (static), got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if n_steps_train is not None and steps > n_steps_train:
        raise ValueError(f"steps must be <= the schedule's {n_steps_train} training steps, got {steps}")
    return steps


def start_index(start_step, n: int) -> jax.Array:
    """Traced int32 loop lower bound, clipped to [0, n]."""
    return jnp.clip(jnp.asarray(start_step, jnp.int32), 0, n)


def end_index(end_step: int | None, n: int) -> int:
    """The static loop upper bound: n, or `end_step` (a Python int in [0, n]) to stop early and return the state
    that loop step `end_step` would consume (the SDXL base's hand-over to the refiner)."""
    if end_step is None:
        return n
    if isinstance(end_step, bool) or not isinstance(end_step, int) or not 0 <= end_step <= n:
        raise ValueError(f"end_step must be a Python int in [0, {n}] (static), got {end_step!r}")
    return end_step


def as_f32(v) -> jax.Array:
    return jnp.asarray(v, jnp.float32)


def step_noise(keys: jax.Array | None, i: jax.Array, x: jax.Array) -> jax.Array:
    """Standard normal noise [B, ...] for loop step i: image b uses fold_in(keys[b], i). keys=None gives 0
    (for the deterministic settings eta = 0)."""
    if keys is None:
        return jnp.zeros_like(x)
    if keys.shape[:1] != x.shape[:1]:
        raise ValueError(f"need one key per image: keys {keys.shape} for latents {x.shape}")
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:], jnp.float32))(keys)


def report(progress: Progress, i: jax.Array) -> None:
    """Call progress(i) from inside the compiled loop (only if a callback was given)."""
    if progress is not None:
        jax.debug.callback(lambda j: progress(int(j)), i, ordered=False)


def full_t(t: jax.Array, x: jax.Array) -> jax.Array:
    """Scalar time index -> int32 [B]."""
    return jnp.full((x.shape[0],), t, jnp.int32)


# ----------------------------------------------------------------------------------------- k-diffusion helpers


def karras_sigmas(schedule: Schedule, steps: int, rho: float = 7.0) -> tuple[jax.Array, jax.Array]:
    """Karras et al. (2022) eq. 5 grid: sigma_i = (s_max^(1/rho) + i/(S-1) (s_min^(1/rho) - s_max^(1/rho)))^rho.

    Returns (sigmas [S+1] float32 with a final 0, t [S] int32). sigma_min/max are the schedule's own
    sigma_0 / sigma_{T-1}. The U-Net gets t = round(sigma_to_t(sigma_i)) (as diffusers does with
    `use_karras_sigmas`; k-diffusion passes the fractional t, our eps_fn contract is int32).
    """
    ramp = jnp.linspace(0.0, 1.0, steps, dtype=jnp.float32)
    min_inv = schedule.sigma_min ** (1.0 / rho)
    max_inv = schedule.sigma_max ** (1.0 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    t = jnp.clip(jnp.round(sigma_to_t(schedule, sigmas)), 0, schedule.n_steps - 1).astype(jnp.int32)
    return jnp.concatenate([sigmas, jnp.zeros((1,), jnp.float32)]), t


def schedule_sigmas(schedule: Schedule, steps: int) -> tuple[jax.Array, jax.Array]:
    """The schedule's sigmas at S evenly spaced fractional table indices t = linspace(T-1, 0, S), log-linearly
    interpolated between table entries (k-diffusion `get_sigmas(n)`, diffusers' Euler schedulers with
    timestep_spacing "linspace"; they interpolate sigma linearly, within 1e-4). The U-Net gets round(t), as with
    `karras_sigmas`. Returns (sigmas [S+1] float32 with a final 0, t [S] int32)."""
    t = np.linspace(schedule.n_steps - 1, 0, steps)
    sigmas = t_to_sigma(schedule, t)
    return jnp.concatenate([sigmas, jnp.zeros((1,), jnp.float32)]), jnp.asarray(np.round(t).astype(np.int32))


def k_denoise(eps_fn: EpsFn, x: jax.Array, sigma: jax.Array, t: jax.Array) -> jax.Array:
    """D(x; sigma) = x - sigma eps_theta(x / sqrt(sigma^2 + 1), t(sigma))  (k-diffusion DiscreteEpsDDPMDenoiser).

    x is in sigma space (x = x_0 + sigma eps); x / sqrt(sigma^2 + 1) is the VP-space x_t the U-Net expects.
    """
    c_in = 1.0 / jnp.sqrt(sigma**2 + 1.0)
    eps = eps_fn(x * c_in, full_t(t, x)).astype(jnp.float32)
    return x + eps * (-sigma)


def k_noise_to_start(sigmas: jax.Array, x0: jax.Array, noise: jax.Array, start_step) -> jax.Array:
    """img2img start for a k-sampler over `sigmas` [S+1]: the sampler's input x_T such that the loop starts
    at x = x_0 + sigma_{start_step} noise in sigma space. The samplers multiply their input by sigmas[0]
    (= sigma_max, k-diffusion's `x = noise * sigmas[0]`), so we return that x divided by sigmas[0].
    start_step = S gives sigma = 0, i.e. x_0 itself.
    """
    s = jnp.clip(jnp.asarray(start_step, jnp.int32), 0, sigmas.shape[0] - 1)
    return (x0.astype(jnp.float32) + sigmas[s] * noise.astype(jnp.float32)) / sigmas[0]
