"""`ldm_jax.load`: a CompVis checkpoint (.ckpt / .safetensors) or a converted directory -> StableDiffusion.

No torch and no pickle code execution (see `convert.ckpt_reader`). Tensors are read memory-mapped and
converted one at a time (upcast to `param_dtype`, relayout, put on the device), so loading holds at most
the file's pages plus one set of parameters.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
from tqdm.auto import tqdm

from convert.detect import infer_config, prediction_note
from convert.errors import CheckpointError
from convert.mapping import normalise_keys, state_dict_to_params
from convert.prediction import check_prediction, with_prediction
from convert.readers import read_state_dict
from ldm_jax.configs import ModelConfig
from ldm_jax.models.build import abstract_params
from ldm_jax.stable_diffusion import StableDiffusion, as_dtype

CONFIG_METADATA_KEY = "ldm_jax.config"  # safetensors __metadata__ entry written by `ldm-jax export`
# __metadata__ entries of `ldm-jax export --vae/--lora`: what was baked into the weights (the loras entry is JSON)
BAKED_HEADER_KEYS = {"vae": "ldm_jax.vae", "vae_sha256": "ldm_jax.vae_sha256", "loras": "ldm_jax.loras"}
# The small model ldm-jax trains and ships (scripts/train_shapes_model.py), used when no checkpoint is given.
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "shapes", "model.safetensors")

def file_config(path: str) -> ModelConfig | None:
    """The config an ldm-jax export stored in the safetensors header, if any."""
    if not path.endswith(".safetensors"):
        return None
    from convert.safetensors_io import read_safetensors

    _, meta = read_safetensors(path)
    if meta and CONFIG_METADATA_KEY in meta:
        try:
            return ModelConfig.from_json(meta[CONFIG_METADATA_KEY])
        except ValueError as e:
            raise CheckpointError(f"{path}: the model config in its header ({CONFIG_METADATA_KEY}) is damaged: "
                                  f"{e}") from e
    return None


def baked_in(header) -> dict:
    """What a safetensors `__metadata__` written by `ldm-jax export --vae/--lora` says was baked into the weights:
    {"vae": file name, "vae_sha256": hex, "loras": [{"name", "scale", "sha256"}]}, only the entries it has (a
    damaged loras entry is left out: it labels the weights, it does not describe them)."""
    out = {name: header[key] for name, key in BAKED_HEADER_KEYS.items() if key in (header or {})}
    if "loras" in out:
        try:
            out["loras"] = json.loads(out["loras"])
        except ValueError:
            out["loras"] = None
        if not isinstance(out["loras"], list):
            del out["loras"]
    return out


def load_state_dict_model(state_dict, *, config: ModelConfig | None = None, ema: bool | None = None,
                          param_dtype="float32", allow_unexpected=False, allow_nonfinite=False, progress=True,
                          prediction: str | None = None):
    """A CompVis state dict -> (config, params, MappingReport). prediction: "eps" / "v" instead of the config's
    (an inferred SD 2.x config then also takes that flavour's name and resolution: `convert.detect.infer_config`)."""
    state_dict = normalise_keys(state_dict)
    config = with_prediction(config, prediction) if config else infer_config(state_dict, prediction)
    shapes = abstract_params(config)
    total = len(jax.tree_util.tree_leaves(shapes))
    # disable=None: bars only on a terminal (no progress noise in logs or in one-line errors)
    with tqdm(total=total, desc="loading weights", unit="tensor", disable=not progress or None, leave=False) as bar:
        params, report = state_dict_to_params(
            state_dict, shapes, ema=ema, dtype=np.dtype(as_dtype(param_dtype)), allow_unexpected=allow_unexpected,
            allow_nonfinite=allow_nonfinite, place=jax.device_put, progress=lambda _: bar.update())
    return config, params, report


def load(path: str | os.PathLike | None = None, ema: bool | None = None, *, param_dtype="float32", dtype="float32",
         config: ModelConfig | None = None, attention_impl: str = "auto", allow_unexpected: bool = False,
         allow_nonfinite: bool = False, progress: bool = False,
         vae: str | os.PathLike | None = None, loras=None, prediction: str | None = None,
         embeddings=None) -> StableDiffusion:
    """Load Stable Diffusion weights.

    path: a CompVis `.ckpt` / `.safetensors` file (SD 1.x / 2.x; SDXL 1.0 base in sgm's layout), or a directory
        written by `ldm-jax convert`; None: the small bundled model (64x64 coloured shapes, trained by ldm-jax
        itself).
    ema: use the EMA U-Net weights (default: when the checkpoint has them, as CompVis does).
    param_dtype: dtype of the loaded parameters (fp16/bf16 files are upcast; default fp32).
    dtype: compute dtype of the modules (e.g. "bfloat16" on GPU/TPU).
    config: override the architecture inferred from tensor shapes (e.g. the tiny test preset).
    progress: progress bars on a terminal, and for an SD 2.x file whose config is inferred one line on stderr saying
        which prediction type (eps or v) was inferred and why (also in `metadata["prediction_note"]`).
    prediction: "eps" or "v": what the U-Net predicts, instead of the config's. SD 2.x files do not say: the 768x768
        models predict v, the 512x512 ones eps, and an inferred config follows ComfyUI's weight test
        (`convert.prediction`); this overrides it (an inferred SD 2.x config then also takes the name and
        resolution of that flavour: sd2 512 / sd2-v 768).
    vae: a standalone CompVis-layout autoencoder file (.safetensors / .ckpt, e.g.
        `vae-ft-mse-840000-ema-pruned.safetensors`, or a full SD checkpoint's first_stage_model.*) whose weights
        replace the model's `vae` (`convert.vae_file`); its base name is recorded in `metadata["vae"]`.
    loras: kohya-ss LoRA files to merge into the weights, [(path, scale), ...] (a bare path: scale 1.0), in order:
        W += scale * alpha / rank * up @ down for each module (`convert.lora`); recorded in `metadata["loras"]`.
        SD 1.x / 2.x LoRAs (lora_unet_*, lora_te_*) and SDXL ones (lora_unet_* in sgm or diffusers names,
        lora_te1_*, lora_te2_*); a LoRA of another family is one line naming both.
    embeddings: textual-inversion files (A1111 .pt/.safetensors, diffusers learned_embeds; SDXL: clip_l + clip_g),
        [path or (path, token), ...]: the prompt word `token` (default: the file's base name, as A1111) stands for
        the file's vectors (`convert.embeddings`, `StableDiffusion.add_tokens`); recorded in `metadata["embeddings"]`.
    """
    as_dtype(param_dtype), as_dtype(dtype)  # a bad name fails here, before gigabytes are read
    check_prediction(prediction)
    if path is None:
        if not os.path.exists(DEFAULT_MODEL):
            raise CheckpointError("the bundled default model is missing from this install; pass a checkpoint path")
        path = DEFAULT_MODEL
    path = os.fspath(path)
    declared = (config or _declared_config(path)) if vae is not None or loras or embeddings else None
    if vae is not None:  # a missing, diffusers-layout or (where the model declares its config) misshapen VAE
        from convert.vae_file import check_vae_file, swap_vae  # fails before gigabytes are read

        check_vae_file(vae, declared)
    if loras:  # a missing file, not a kohya LoRA, or (config declared) a module the model lacks: before loading
        from convert.lora import check_lora_file, normalise_loras

        loras = normalise_loras(loras)
        for lora, _ in loras:
            check_lora_file(lora, declared)
    if embeddings:  # likewise a missing or misfitting embedding, or a token that cannot be used
        from convert.embeddings import apply_embeddings, check_embeddings

        embeddings = check_embeddings(embeddings, declared)
    if os.path.isdir(path):
        from convert.orbax_io import read_converted

        sd = read_converted(path, ema=ema, param_dtype=param_dtype, dtype=dtype, attention_impl=attention_impl)
        predicting = with_prediction(sd.config, prediction)
        if predicting is not sd.config:
            sd = sd.replace(config=predicting)
        if prediction is not None and "prediction_note" in sd.metadata:  # the conversion's guess no longer holds
            note = f"prediction {prediction} (given; not inferred from the weights)"
            sd = sd.replace(metadata={**sd.metadata, "prediction_note": note})
    else:
        sd = _load_file(path, ema=ema, param_dtype=param_dtype, dtype=dtype, config=config,
                        attention_impl=attention_impl, allow_unexpected=allow_unexpected,
                        allow_nonfinite=allow_nonfinite, progress=progress, prediction=prediction)
    if vae is not None:
        sd = swap_vae(sd, vae, allow_unexpected=allow_unexpected, allow_nonfinite=allow_nonfinite)
    if loras:
        from convert.lora import apply_loras

        sd = apply_loras(sd, loras)
    if embeddings:
        sd = apply_embeddings(sd, embeddings)
    return sd


def _declared_config(path: str) -> ModelConfig | None:
    """The architecture a converted directory or an ldm-jax .safetensors names before its tensors are read."""
    if os.path.isdir(path):
        from convert.orbax_io import is_converted_dir, read_info

        return read_info(path)[0] if is_converted_dir(path) else None
    return file_config(path) if os.path.isfile(path) else None


def _load_file(path: str, *, ema, param_dtype, dtype, config, attention_impl, allow_unexpected, allow_nonfinite,
               progress, prediction=None) -> StableDiffusion:
    """A CompVis .ckpt / .safetensors file -> StableDiffusion (`load`'s file case)."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    config = config or file_config(path)
    state_dict = read_state_dict(path)
    note = None if config else prediction_note(normalise_keys(state_dict), prediction)
    if note and progress:
        print(f"{os.path.basename(path)}: {note}", file=sys.stderr, flush=True)
    config, params, report = load_state_dict_model(
        state_dict, config=config, ema=ema, param_dtype=param_dtype, allow_unexpected=allow_unexpected,
        allow_nonfinite=allow_nonfinite, progress=progress, prediction=prediction)
    meta = {"source": os.path.basename(path), "kind": config.name, "ema": report.used_ema,
            "report": report.summary(), **({"prediction_note": note} if note else {})}
    if path.endswith(".safetensors"):  # an `ldm-jax export --vae/--lora` names what it baked in (PNG text)
        from convert.safetensors_io import read_safetensors

        meta.update(baked_in(read_safetensors(path)[1]))
    return StableDiffusion(config, params, dtype=dtype, attention_impl=attention_impl, metadata=meta)

