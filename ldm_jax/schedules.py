"""The forward-process noise schedule of DDPM (Ho et al. 2020, "Denoising Diffusion Probabilistic Models").

    q(x_t | x_0) = N(x_t; sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),   alpha_bar_t = prod_{s<=t} (1 - beta_s)

Mirrors CompVis `ldm/modules/diffusionmodules/util.py::make_beta_schedule` and labml
`labml_nn/diffusion/stable_diffusion/latent_diffusion.py` (`LatentDiffusion.__init__`): the betas are built in
float64 and every table is cast to float32 once, so the values are bit-for-bit labml's `beta` / `alpha_bar`.

Index convention (CompVis/labml): table index t = 0..T-1 is the diffusion step t+1 of the paper; the U-Net is called
with this 0-based integer t.

For k-diffusion-style samplers (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models"; crowsonkb/k-diffusion `external.DiscreteEpsDDPMDenoiser`) the same process is written in "sigma space":
x_sigma = x_t / sqrt(alpha_bar_t) = x_0 + sigma_t eps with sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t);
`sigma_to_t` maps a continuous sigma back to a (fractional) table index by linear interpolation in log sigma.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.configs import ScheduleConfig


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Float32 tables of length T (a pytree: the arrays are leaves, `n_steps` is static).

    betas: beta_t; alphas: alpha_t = 1 - beta_t; alphas_cumprod: alpha_bar_t; sqrt_alphas_cumprod;
    sqrt_one_minus_alphas_cumprod; sigmas: sqrt((1 - alpha_bar_t) / alpha_bar_t) (increasing in t);
    log_sigmas: log sigma_t. All derived from float64 betas, then cast.
    """

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    sigmas: jax.Array
    log_sigmas: jax.Array
    n_steps: int

    @property
    def alpha_bar(self) -> jax.Array:
        """alpha_bar_t (labml's name for `alphas_cumprod`)."""
        return self.alphas_cumprod

    @property
    def sigma_min(self) -> jax.Array:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> jax.Array:
        return self.sigmas[-1]


_DATA = [f.name for f in dataclasses.fields(Schedule) if f.name != "n_steps"]
jax.tree_util.register_dataclass(Schedule, data_fields=_DATA, meta_fields=["n_steps"])


def make_betas(cfg: ScheduleConfig) -> np.ndarray:
    """beta_1..beta_T in float64 (CompVis `make_beta_schedule`)."""
    if cfg.n_steps < 2:
        raise ValueError(f"schedule needs n_steps >= 2, got {cfg.n_steps}")
    if cfg.kind == "scaled_linear":  # CompVis calls this "linear": linear in sqrt(beta)
        return np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.n_steps, dtype=np.float64) ** 2
    if cfg.kind == "linear":
        return np.linspace(cfg.beta_start, cfg.beta_end, cfg.n_steps, dtype=np.float64)
    raise ValueError(f"unknown schedule kind {cfg.kind!r}; choose 'scaled_linear' or 'linear'")


def make_schedule(cfg: ScheduleConfig | None = None) -> Schedule:
    """Build the float32 `Schedule` from a `ScheduleConfig` (float64 numpy math; cheap, fine inside jit)."""
    cfg = cfg or ScheduleConfig()
    betas = make_betas(cfg)
    alphas = 1.0 - betas
    alpha_bar = np.cumprod(alphas)  # alpha_bar_t, float64
    sigmas = np.sqrt((1.0 - alpha_bar) / alpha_bar)
    f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))  # noqa: E731 - cast on the host: no eager XLA convert
    return Schedule(
        betas=f32(betas),
        alphas=f32(alphas),
        alphas_cumprod=f32(alpha_bar),
        sqrt_alphas_cumprod=f32(np.sqrt(alpha_bar)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - alpha_bar)),
        sigmas=f32(sigmas),
        log_sigmas=f32(np.log(sigmas)),
        n_steps=int(cfg.n_steps),
    )


def _per_image(v: jax.Array, ndim: int) -> jax.Array:
    """[B] -> [B, 1, ..., 1] (or a scalar unchanged) to broadcast against x [B, h, w, C]."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (ndim - v.ndim)) if v.ndim else v


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.  x0, noise [B, h, w, C]; t int [B] or scalar."""
    t = jnp.asarray(t, jnp.int32)
    a = _per_image(schedule.sqrt_alphas_cumprod[t], x0.ndim)
    b = _per_image(schedule.sqrt_one_minus_alphas_cumprod[t], x0.ndim)
    return a * x0.astype(jnp.float32) + b * noise.astype(jnp.float32)


def sigma_to_t(schedule: Schedule, sigma: jax.Array) -> jax.Array:
    """Fractional table index t(sigma), float32, same shape as sigma (k-diffusion `DiscreteSchedule.sigma_to_t`).

    Linear interpolation of log sigma between neighbouring table entries, clamped to [0, T-1].
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    log_sigma = jnp.log(sigma)
    ls = schedule.log_sigmas  # [T], increasing
    # k-diffusion: low_idx = (log_sigma - ls >= 0).cumsum(0).argmax(0).clamp(max=T-2); the same as below for
    # an increasing table (last index with ls <= log_sigma, 0 if none).
    count = jnp.sum((log_sigma[..., None] - ls) >= 0, axis=-1)
    low_idx = jnp.clip(count - 1, 0, schedule.n_steps - 2)
    low, high = ls[low_idx], ls[low_idx + 1]
    w = jnp.clip((low - log_sigma) / (low - high), 0.0, 1.0)
    return (1.0 - w) * low_idx + w * (low_idx + 1)


def t_to_sigma(schedule: Schedule, t: jax.Array) -> jax.Array:
    """sigma at a fractional table index t, log-linear interpolation (k-diffusion `DiscreteSchedule.t_to_sigma`)."""
    t = jnp.asarray(t, jnp.float32)
    low_idx = jnp.clip(jnp.floor(t).astype(jnp.int32), 0, schedule.n_steps - 1)
    high_idx = jnp.clip(jnp.ceil(t).astype(jnp.int32), 0, schedule.n_steps - 1)
    w = t - low_idx
    return jnp.exp((1.0 - w) * schedule.log_sigmas[low_idx] + w * schedule.log_sigmas[high_idx])
