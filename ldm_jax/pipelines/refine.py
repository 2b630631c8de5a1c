"""SDXL's ensemble of expert denoisers (Podell et al. 2023, "SDXL", section 2.5; diffusers' "base + refiner" with
`denoising_end` / `denoising_start`): the base model runs the high-noise part of one sampling run and hands its
still-noisy latents to the refiner, which runs the rest with its own text encoder and conditioning.

Both halves are one txt2img request each (`generate.txt2img` with denoising_end, then with denoising_start): the
same prompts, negative prompts, sampler, step count and seed, so the loop steps (`samplers.handover_step`) and the
per-step noise of the stochastic samplers (drawn from (seed, image, loop step)) are those of a single run. With
DDIM, DDPM and Euler a the split run equals the unsplit one when both halves use the same model; DPM++ 2M and PLMS
start their multistep history again at the hand-over, as diffusers' refiner scheduler does.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ldm_jax.errors import UserError
from ldm_jax.pipelines.generate import Timings, txt2img

HANDOVER = 0.8  # diffusers' guide: the base runs the first 80% of the schedule (`high_noise_frac`)


def is_sdxl_base(config) -> bool:
    """Whether a model can hand over to the refiner: an SDXL base model (two text encoders), not its inpainting
    U-Net."""
    return config.is_sdxl and not config.is_inpainting


def check_pair(base, refiner) -> None:
    """One line when `refiner` cannot take over `base`'s latents: it must be an SDXL refiner, the base an SDXL base
    model, and both must share the latent space (channels, VAE factor) and the noise schedule."""
    if not refiner.config.is_sdxl_refiner:
        raise UserError(f"the refiner must be an SDXL refiner model (sd_xl_refiner_1.0); got {refiner.config.name}")
    if not is_sdxl_base(base.config):
        raise UserError(f"the base model must be an SDXL base model (two text encoders) to hand over to the refiner; "
                        f"got {base.config.name}")
    b, r = base.config, refiner.config
    same = (b.unet.out_channels, b.vae.downsample_factor, b.schedule) == (
        r.unet.out_channels, r.vae.downsample_factor, r.schedule)
    if not same:
        raise UserError(f"{b.name} and {r.name} do not share their latents (channels, VAE factor) and noise schedule; "
                        "the refiner cannot go on from the base's latents")


def base_and_refiner(base, refiner, prompts: str | Sequence[str], *, handover: float = HANDOVER,
                     negative_prompts=None, steps: int = 50, sampler: str = "ddim", guidance_scale: float = 7.5,
                     eta: float | None = None, height: int | None = None, width: int | None = None, seed: int = 0,
                     latents=None, output: str = "images", progress: bool | str = False,
                     timings: Timings | None = None, aesthetic_scores: tuple[float, float] | None = None
                     ) -> np.ndarray:
    """txt2img with the SDXL base model for the first `handover` of the schedule (0.8: diffusers' guide), then the
    refiner for the rest; arguments as `txt2img` (latents: x_T of the base; aesthetic_scores: the refiner's).
    Returns uint8 images, or the final latents. timings: the two requests' compile and run seconds, summed."""
    check_pair(base, refiner)
    import jax

    if jax.process_count() > 1:  # each process gets its own rows of the base's latents; the refiner needs all
        raise UserError("base_and_refiner runs in one process (multi-host: not supported yet)")
    common = dict(negative_prompts=negative_prompts, steps=steps, sampler=sampler, guidance_scale=guidance_scale,
                  eta=eta, height=height, width=width, seed=seed, progress=progress)
    first, second = Timings(), Timings()
    handed = txt2img(base, prompts, **common, latents=latents, output="latents", timings=first,
                     denoising_end=handover)
    out = txt2img(refiner, prompts, **common, latents=handed, output=output, timings=second,
                  denoising_start=handover, aesthetic_scores=aesthetic_scores)
    if timings is not None:
        timings.compile, timings.run = first.compile + second.compile, first.run + second.run
        timings.cached = first.cached and second.cached
        timings.extra = {"base": first, "refiner": second}
    return out
