"""eps- or v-prediction: what an SD 2.x checkpoint's U-Net was trained to output, which its shapes do not show.

Stability AI ships SD 2.0 / 2.1 in two flavours with identical tensor shapes: the 512x512 "base" models predict
the noise eps (`512-base-ema.ckpt`, `v2-1_512-ema-pruned`) and the 768x768 models predict v (Salimans & Ho 2022;
`768-v-ema.ckpt`, `v2-1_768-ema-pruned`); the inpainting model (`512-inpainting-ema`, 9 input channels) predicts
eps. The files carry no flag, so this follows ComfyUI's test (`comfy/supported_models.py`, `SD20.model_type`):
for a 4-channel SD 2.x U-Net, v-prediction iff the population standard deviation (torch.std(unbiased=False)) of
`model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias` exceeds 0.09; 9-channel models are eps.
Index 11 is the last output block of the full-size U-Net; for other sizes the rule reads the last output block's
first transformer (the same block). SD 1.x is eps. Callers can override the guess (`ldm_jax.load(prediction=)`,
`ldm-jax convert --prediction`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np

from ldm_jax.configs import PREDICTIONS, ModelConfig, ScheduleConfig

U = "model.diffusion_model."
V_STD_THRESHOLD = 0.09  # ComfyUI SD20.model_type
SD2_IMAGE_SIZE = {"eps": 512, "v": 768}  # the resolution each flavour was trained at
SD2_NAME = {"eps": "sd2", "v": "sd2-v"}  # the name of each 4-channel flavour (the presets')
_OUTPUT_BLOCK = re.compile(re.escape(U) + r"output_blocks\.(\d+)\.")


def rule_key(sd: Mapping[str, object]) -> str:
    """The tensor ComfyUI's rule reads: the first transformer's norm1.bias in the U-Net's last output block."""
    last = max((int(m.group(1)) for k in sd for m in [_OUTPUT_BLOCK.match(k)] if m), default=11)
    return f"{U}output_blocks.{last}.1.transformer_blocks.0.norm1.bias"


def infer_prediction(sd: Mapping[str, object], sd2: bool, in_channels: int) -> tuple[str, str]:
    """("eps" | "v", one line saying why) for a (key-normalised) CompVis state dict."""
    if not sd2:
        return "eps", "prediction eps: SD 1.x checkpoints predict eps"
    if in_channels != 4:
        return "eps", f"prediction eps: SD 2.x inpainting U-Nets ({in_channels} input channels) predict eps"
    key = rule_key(sd)
    if key not in sd:
        return "eps", f"prediction eps: no {key} to apply ComfyUI's SD 2.x v-prediction test to"
    std = float(np.asarray(sd[key], np.float64).std())  # population std, as torch.std(unbiased=False)
    if std > V_STD_THRESHOLD:
        return "v", (f"prediction v (as the 768x768 SD 2.x models): std {std:.4f} of {key} > {V_STD_THRESHOLD} "
                     "(ComfyUI's SD 2.x test)")
    return "eps", (f"prediction eps (as the 512x512 SD 2.x base models): std {std:.4f} of {key} <= "
                   f"{V_STD_THRESHOLD} (ComfyUI's SD 2.x test)")


def check_prediction(prediction: str | None) -> None:
    if prediction is not None and prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")


def with_prediction(config: ModelConfig, prediction: str | None) -> ModelConfig:
    """`config` predicting `prediction` (None: unchanged): the schedule's prediction type changes, and an SD 2.x
    config named and sized as a flavour (sd2 at 512, sd2-v at 768: the presets, inferred configs and what convert
    and export store for them) becomes the other flavour, as `infer_config(sd, prediction)` names it, so a file, its
    converted directory and its export given the same --prediction load as the same model (name, default size)."""
    check_prediction(prediction)
    if prediction is None or prediction == config.schedule.prediction:
        return config
    flavour = {}
    if config.name == SD2_NAME[config.schedule.prediction] and config.image_size == SD2_IMAGE_SIZE[
            config.schedule.prediction]:
        flavour = {"name": SD2_NAME[prediction], "image_size": SD2_IMAGE_SIZE[prediction]}
    return dataclasses.replace(config, schedule=dataclasses.replace(config.schedule, prediction=prediction), **flavour)


def kind_predicting(kind: str, prediction: str | None) -> str:
    """The kind ('sd2' / 'sd2-v') of a 4-channel SD 2.x model predicting `prediction` (None: `kind` as found);
    other kinds are unchanged (SD 1.x, the inpainting models)."""
    return SD2_NAME[prediction] if prediction is not None and kind in SD2_NAME.values() else kind


def sd2_flavour(kind: str, prediction: str) -> dict:
    """ModelConfig fields of an inferred SD 2.x config predicting `prediction`: its name ("sd2", "sd2-v" or
    "sd2-inpaint", as the presets), schedule and training resolution."""
    inpaint = kind == "sd2-inpaint"  # 512x512 whatever it predicts
    name = "sd2-inpaint" if inpaint else SD2_NAME[prediction]
    return {"name": name, "schedule": ScheduleConfig(prediction=prediction),
            "image_size": 512 if inpaint else SD2_IMAGE_SIZE[prediction]}
