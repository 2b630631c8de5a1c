"""The base model a run starts from: `load_base` (a checkpoint, the bundled model, or random weights of a preset),
`base_info` (how a run records its base in the checkpoint metadata) and `check_resolution` (the training image sizes
that base accepts)."""

from __future__ import annotations

import os

import jax

from ldm_jax.errors import UserError
from ldm_jax.train.config import TrainConfig


def load_base(checkpoint: str | None, preset_name: str | None, seed: int = 0, prediction: str | None = None):
    """The starting model: `ldm_jax.load(checkpoint)` (None: the bundled model), or random weights of a preset
    (U-Net, VAE and text encoder at random init; the text encoder stays frozen there). prediction: "eps" / "v"
    instead of the base's (`ldm_jax.load(prediction=)`: SD 2.x files do not say; their guess is from the weights)."""
    if checkpoint is not None and preset_name is not None:
        raise UserError("give one of --checkpoint BASE or --preset NAME, not both")
    if preset_name is not None:
        from ldm_jax.configs import preset
        from ldm_jax.models.build import random_params
        from ldm_jax.stable_diffusion import StableDiffusion

        from convert.prediction import with_prediction

        try:
            config = with_prediction(preset(preset_name), prediction)
        except ValueError as e:
            raise UserError(str(e)) from None
        check_trainable(config)
        params = jax.device_put(random_params(config, seed))  # one transfer, no per-shape convert compiles
        return StableDiffusion(config, params, metadata={"source": f"preset:{preset_name}", "seed": seed})
    import ldm_jax

    sd = ldm_jax.load(checkpoint, prediction=prediction)
    check_trainable(sd.config)
    return sd


def check_trainable_early(checkpoint: str | None, preset_name: str | None) -> None:
    """`check_trainable` before the data is read or the weights loaded, where the base tells its kind cheaply: a
    preset, or a file or directory declaring its config. Other files are checked once loaded."""
    from ldm_jax.configs import preset

    if preset_name is not None:
        try:
            config = preset(preset_name)
        except ValueError:
            return  # an unknown preset is refused where the base loads
    else:
        from ldm_jax.warm_start import peek_config

        config = peek_config(checkpoint)
    if config is not None:
        check_trainable(config)


def check_trainable(config) -> None:
    """One line for a model the trainer cannot train: an inpainting U-Net (its extra mask and masked-image inputs
    are not fed), the SDXL refiner (its aesthetic-score conditioning is not fed)."""
    if config.is_inpainting:
        raise UserError(f"training inpainting U-Nets ({config.name}: {config.unet.in_channels} input channels) is not "
                        "supported; ldm-jax trains text-to-image U-Nets (4 latent channels in)")
    if config.is_sdxl_refiner:
        raise UserError(f"training the SDXL refiner ({config.name}: an aesthetic score in its conditioning) is not "
                        "supported; ldm-jax trains SD 1.x, 2.x and SDXL base models")


def run_prediction(meta: dict, prediction: str | None, where: str) -> str:
    """What the U-Net of the run whose checkpoint metadata is `meta` was trained to predict (its base model's config
    as the run recorded it); a different `prediction` (--prediction) is refused: the U-Net's target would change."""
    run = ((meta.get("config") or {}).get("schedule") or {}).get("prediction", "eps")
    if prediction is not None and prediction != run:
        raise UserError(f"{where}: the run trains its U-Net to predict {run}, not {prediction}; leave --prediction out "
                        "or give the same (a new --out starts another run)")
    return run


def prediction_line(sd, given: str | None) -> str | None:
    """For a model that predicts v or is SD 2.x (whose files do not say which), one line saying what the U-Net is
    trained to predict and why: `given` ("--prediction", "the run's"), else the loader's note, else the config."""
    config = sd.config
    if config.schedule.prediction == "eps" and config.text.key_layout != "open_clip":
        return None
    why = given or (sd.metadata or {}).get("prediction_note") or "as the base model's config says"
    return f"training the U-Net to predict {config.schedule.prediction} ({why})"


def base_info(cfg: TrainConfig) -> dict:
    if cfg.checkpoint is None and cfg.preset is None:
        from ldm_jax.loading import DEFAULT_MODEL

        return {"checkpoint": DEFAULT_MODEL, "preset": None}
    return {"checkpoint": cfg.checkpoint and os.path.abspath(cfg.checkpoint), "preset": cfg.preset}


def size_multiple(config) -> int:
    """Image sides must be multiples of this: the autoencoder's factor x the U-Net's downsamplings."""
    return config.vae.downsample_factor * 2 ** (len(config.unet.channel_multipliers) - 1)


def check_resolution(config, resolution: int) -> None:
    multiple = size_multiple(config)
    if resolution < multiple or resolution % multiple:
        raise UserError(f"--resolution must be a positive multiple of {multiple} for this model, got {resolution}")
