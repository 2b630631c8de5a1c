"""The base model a run starts from: `load_base` (a checkpoint, the bundled model, or random weights of a preset),
`base_info` (how a run records its base in the checkpoint metadata) and `check_resolution` (the training image sizes
that base accepts)."""

from __future__ import annotations

import os

import jax

from ldm_jax.errors import UserError
from ldm_jax.train.config import TrainConfig


def load_base(checkpoint: str | None, preset_name: str | None, seed: int = 0):
    """The starting model: `ldm_jax.load(checkpoint)` (None: the bundled model), or random weights of a preset
    (U-Net, VAE and text encoder at random init; the text encoder stays frozen there)."""
    if checkpoint is not None and preset_name is not None:
        raise UserError("give one of --checkpoint BASE or --preset NAME, not both")
    if preset_name is not None:
        from ldm_jax.configs import preset
        from ldm_jax.models.build import random_params
        from ldm_jax.stable_diffusion import StableDiffusion

        try:
            config = preset(preset_name)
        except ValueError as e:
            raise UserError(str(e)) from None
        params = jax.device_put(random_params(config, seed))  # one transfer, no per-shape convert compiles
        return StableDiffusion(config, params, metadata={"source": f"preset:{preset_name}", "seed": seed})
    import ldm_jax

    return ldm_jax.load(checkpoint)


def base_info(cfg: TrainConfig) -> dict:
    if cfg.checkpoint is None and cfg.preset is None:
        from ldm_jax.loading import DEFAULT_MODEL

        return {"checkpoint": DEFAULT_MODEL, "preset": None}
    return {"checkpoint": cfg.checkpoint and os.path.abspath(cfg.checkpoint), "preset": cfg.preset}


def check_resolution(config, resolution: int) -> None:
    levels = len(config.unet.channel_multipliers)
    multiple = config.vae.downsample_factor * 2 ** (levels - 1)
    if resolution < multiple or resolution % multiple:
        raise UserError(f"--resolution must be a positive multiple of {multiple} for this model, got {resolution}")
