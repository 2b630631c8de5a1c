"""Samplers as pure JAX functions over a guidance-free `eps_fn(x, t) -> eps_theta`, one compiled loop each.

    name       method                                           mirrors
    "ddim"     DDIM, Song et al. 2021 (eta >= 0)                labml sampler/ddim.py (CompVis ddim.py)
    "ddpm"     ancestral DDPM, Ho et al. 2020                   labml sampler/ddpm.py
    "plms"     PLMS, Liu et al. 2022                            CompVis ldm/models/diffusion/plms.py
    "dpmpp_2m" DPM-Solver++(2M), Lu et al. 2022, Karras sigmas  k-diffusion sample_dpmpp_2m
    "euler_a"  Euler ancestral, Karras et al. 2022              k-diffusion sample_euler_ancestral

Uniform entry point: `sample(name, eps_fn, x_T, schedule, keys, steps=..., eta=None, start_step=0)`.

x_T: for txt2img, standard normal latents [B, h, w, C] (the k-samplers multiply by sigma_max inside, k-diffusion
style). For img2img (strength s): `start = start_step_for_strength(steps, s, n_loop_steps(name, T, steps))`,
`x_T = noise_to_start(name, schedule, x0, noise, steps, start)`, then `sample(..., start_step=start)`. The loop
then runs only loop steps i >= start, and the input is x_0 noised to the level that step `start` consumes:
q_sample at its time step for ddim/plms/ddpm (VP space), x_0 + sigma_start noise for the k-samplers (sigma space,
returned divided by sigma_max to fit the input convention). strength 1 noises to the first step's level
(nearly pure noise, not exactly; as diffusers); strength 0 runs no step and returns x_0.

eta: None means each sampler's default (`default_eta`): 0 for "ddim" (deterministic), 1 for "euler_a" (ancestral).
It is traced (no recompilation). "ddpm", "plms" and "dpmpp_2m" (`NO_ETA`) have no eta: a concrete non-zero value
is an error, a traced one is ignored.

Inpainting with a plain U-Net: `known=Known(x0, keep, noise)` re-imposes x0, noised to the current level, on the
kept region at the start of every loop step (CompVis `ddim_sampling(mask=...)`; labml `paint` blends after the
step at the pre-step level instead, an off-by-one we do not copy).

Loop length: `n_loop_steps(name, T, steps)`; equals steps except for ddim/plms when steps does not divide T
(CompVis timestep quirk, e.g. 30 -> 31). start_step indexes that loop. `end_step` (static) stops the loop before
that step and returns the state in the convention of x_T for a run with start_step = end_step (VP-space x_t, or
for the k-samplers sigma-space x / sigma_max), so a second model can go on from it: SDXL's base hands over to
the refiner at `handover_step` (diffusers' `denoising_end` / `denoising_start`).
"""

from __future__ import annotations

import jax
import numpy as np

from ldm_jax.samplers.common import EpsFn, Known, Progress, check_steps
from ldm_jax.samplers.ddim import ddim_noise_to_start, ddim_q_sample, ddim_sample, ddim_timesteps
from ldm_jax.samplers.ddpm import ddpm_noise_to_start, ddpm_sample, ddpm_timesteps
from ldm_jax.samplers.dpm_solver import dpmpp_2m_noise_to_start, dpmpp_2m_sample
from ldm_jax.samplers.euler_ancestral import euler_ancestral_noise_to_start, euler_ancestral_sample
from ldm_jax.samplers.plms import plms_sample
from ldm_jax.schedules import Schedule

__all__ = ["SAMPLERS", "NO_ETA", "Known", "default_eta", "sample", "noise_to_start", "start_step_for_strength",
           "n_loop_steps", "loop_timesteps", "handover_step", "ddim_sample", "ddim_q_sample", "ddim_timesteps",
           "ddpm_sample", "ddpm_timesteps", "plms_sample", "dpmpp_2m_sample", "euler_ancestral_sample"]


def _concrete(v):
    """float(v) if v is known at trace time, else None."""
    try:
        return float(v)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def _no_eta(name: str, eta) -> None:
    if eta is not None and _concrete(eta) not in (None, 0.0):
        raise ValueError(f"sampler {name!r} has no eta (it must be None or 0), got {eta}")


def _needs_keys(name: str, keys, eta) -> None:
    if keys is None and _concrete(eta) != 0.0:
        raise ValueError(f"sampler {name!r} with eta={eta} is stochastic: it needs keys (one per image)")


# loop: start_step, end_step, progress, known (the same for every sampler)
def _ddim(eps_fn, x_T, schedule, keys, *, steps, eta, **loop):
    eta = 0.0 if eta is None else eta
    _needs_keys("ddim", keys, eta)
    return ddim_sample(eps_fn, x_T, schedule, keys, steps=steps, eta=eta, **loop)


def _ddpm(eps_fn, x_T, schedule, keys, *, steps, eta, **loop):
    _no_eta("ddpm", eta)
    return ddpm_sample(eps_fn, x_T, schedule, keys, steps=steps, **loop)


def _plms(eps_fn, x_T, schedule, keys, *, steps, eta, **loop):
    _no_eta("plms", eta)
    return plms_sample(eps_fn, x_T, schedule, keys, steps=steps, **loop)


def _dpmpp_2m(eps_fn, x_T, schedule, keys, *, steps, eta, **loop):
    _no_eta("dpmpp_2m", eta)
    return dpmpp_2m_sample(eps_fn, x_T, schedule, keys, steps=steps, **loop)


def _euler_a(eps_fn, x_T, schedule, keys, *, steps, eta, **loop):
    eta = 1.0 if eta is None else eta
    _needs_keys("euler_a", keys, eta)
    return euler_ancestral_sample(eps_fn, x_T, schedule, keys, steps=steps, eta=eta, **loop)


# name -> sampler with the uniform keyword signature of `sample` (minus the name)
SAMPLERS = {"ddim": _ddim, "ddpm": _ddpm, "plms": _plms, "dpmpp_2m": _dpmpp_2m, "euler_a": _euler_a}
NO_ETA = frozenset({"ddpm", "plms", "dpmpp_2m"})  # samplers without an eta parameter


def default_eta(name: str) -> float | None:
    """The eta used when eta=None: 0.0 for ddim, 1.0 for euler_a, None for the samplers in NO_ETA."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    return {"ddim": 0.0, "euler_a": 1.0}.get(name)


def _check(name: str, steps, schedule: Schedule) -> None:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    check_steps(steps, schedule.n_steps)


def sample(name: str, eps_fn: EpsFn, x_T: jax.Array, schedule: Schedule, keys: jax.Array, *, steps: int,
           eta=None, start_step=0, end_step: int | None = None, progress: Progress = None,
           known: Known | None = None) -> jax.Array:
    """Run sampler `name` from x_T [B, h, w, C] to x_0 [B, h, w, C] float32 (see the module docstring).

    keys: typed key array [B] (one per image); None is allowed for the deterministic cases (plms, dpmpp_2m,
    ddim with eta = 0, euler_a with eta = 0 given as a Python number). steps: static int. eta, start_step:
    Python numbers or traced scalars. progress(i) is called from inside the compiled loop for every executed
    loop step i. known: optional mask-blend inpainting (`Known(x0, keep, noise)`), applied at the start of every
    executed loop step. end_step (static int): stop before that loop step and return its input, in the
    convention of x_T (`handover_step`: SDXL's base-to-refiner hand-over).
    """
    _check(name, steps, schedule)
    return SAMPLERS[name](eps_fn, x_T, schedule, keys, steps=steps, eta=eta, start_step=start_step,
                          end_step=end_step, progress=progress, known=known)


def n_loop_steps(name: str, n_steps_train: int, steps: int) -> int:
    """Number of loop steps the sampler runs for `steps` (ddim/plms: len(ddim_timesteps), else steps)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    if name in ("ddim", "plms"):
        return len(ddim_timesteps(n_steps_train, steps))
    return check_steps(steps, n_steps_train)


def start_step_for_strength(steps: int, strength: float, loop_steps: int | None = None) -> int:
    """img2img: the loop step to start at so that int(strength * steps) steps run (CompVis t_enc, diffusers
    S - t_start). loop_steps: the loop's length, `n_loop_steps(...)` (default steps; ddim/plms may run one more
    step than asked, and those skip one more, so that strength 0 still runs none)."""
    check_steps(steps)
    strength = float(strength)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return (steps if loop_steps is None else loop_steps) - int(strength * steps)


def noise_to_start(name: str, schedule: Schedule, x0: jax.Array, noise: jax.Array, steps: int,
                   start_step) -> jax.Array:
    """The x_T to pass to `sample(name, ..., start_step=start_step)` so that the loop starts from x0 [B, h, w, C]
    noised with `noise` (standard normal, same shape) to the level of loop step start_step (traced allowed)."""
    _check(name, steps, schedule)
    if name in ("ddim", "plms"):
        return ddim_noise_to_start(schedule, x0, noise, steps=steps, start_step=start_step)
    if name == "ddpm":
        return ddpm_noise_to_start(schedule, x0, noise, steps=steps, start_step=start_step)
    if name == "dpmpp_2m":
        return dpmpp_2m_noise_to_start(schedule, x0, noise, steps=steps, start_step=start_step)
    return euler_ancestral_noise_to_start(schedule, x0, noise, steps=steps, start_step=start_step)


def loop_timesteps(name: str, schedule_config, steps: int) -> np.ndarray:
    """The U-Net time step each loop step evaluates, in loop order (decreasing), float64 [n_loop_steps]: DDIM/PLMS
    tau_n..tau_1, DDPM's table indices, Euler a's fractional t = linspace(T-1, 0, S) (diffusers' Euler timesteps),
    DPM++ 2M's rounded t of its Karras sigmas (the one place this compiles a small program)."""
    n = schedule_config.n_steps
    if name in ("ddim", "plms"):
        return ddim_timesteps(n, steps)[::-1].astype(np.float64)
    if name == "ddpm":
        return ddpm_timesteps(n, steps).astype(np.float64)
    if name == "euler_a":
        return np.linspace(n - 1, 0, check_steps(steps, n))
    if name != "dpmpp_2m":
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    from ldm_jax.samplers.common import karras_sigmas
    from ldm_jax.schedules import make_schedule

    return np.asarray(jax.jit(lambda: karras_sigmas(make_schedule(schedule_config), steps)[1])(), np.float64)


def handover_step(name: str, schedule_config, steps: int, fraction: float) -> int:
    """SDXL's ensemble of expert denoisers (Podell et al. 2023; diffusers' `denoising_end` / `denoising_start`):
    the loop step where the base model stops and the refiner goes on, `fraction` of the way through the schedule.
    Loop steps at time steps t >= round(T - fraction T) are the base's (diffusers' `discrete_timestep_cutoff`), the
    rest the refiner's; both models run the same sampler and step count."""
    fraction = float(fraction)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the hand-over fraction must be in (0, 1), got {fraction}")
    cutoff = int(round(schedule_config.n_steps - fraction * schedule_config.n_steps))
    return int(np.sum(loop_timesteps(name, schedule_config, steps) >= cutoff))
