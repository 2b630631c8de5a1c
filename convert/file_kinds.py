"""Name the files Stable Diffusion users pass by mistake where a full CompVis checkpoint is expected.

Each recogniser looks at key names (and, for a lone embedding tensor, one shape) only: tensor data are never
read, so a multi-gigabyte memory-mapped file costs nothing to recognise. Each message says what the file is and
what to pass instead, in one line. Facts used:

* LoRA / LyCORIS: kohya-ss keys `lora_unet_*`, `lora_te_*` (SDXL: `lora_te1_*`, `lora_te2_*`) ending in
  `.lora_down.weight`, `.lora_up.weight`, `.alpha` (LyCORIS: `.hada_w1_a`, `.lokr_w1`, ... on the same prefixes);
  diffusers / PEFT keys with `.lora_A.` / `.lora_B.`, `.lora.down.`, `_lora.up.` or `lora_linear_layer`.
* Textual-inversion embeddings: A1111 `.pt` (`string_to_param`, `string_to_token`, `name`, `step`, ...),
  A1111 `.safetensors` (`emb_params`), SDXL (`clip_l`, `clip_g`), diffusers `learned_embeds` (one tensor named
  after its token). A1111 hypernetworks: `layer_structure`, `activation_func` and integer keys (768, 1280, ...).
* Standalone VAE: CompVis `encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*` without a U-Net.
* diffusers / transformers single components: `UNet2DConditionModel` (`conv_in.*`, `time_embedding.*`,
  `down_blocks.*`), `AutoencoderKL` (`encoder.down_blocks.*`), `CLIPTextModel` (`text_model.*`); a diffusers
  pipeline folder has `model_index.json` and `unet/`, `vae/`, `text_encoder/` folders.
* ControlNet: CompVis `control_model.*` (1.0, bundled with its base model), bare `input_hint_block.*` /
  `zero_convs.*` (1.1); diffusers `controlnet_cond_embedding.*`, `controlnet_down_blocks.*`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

UNET = "model.diffusion_model."
BASE = "pass the base Stable Diffusion checkpoint (e.g. v1-5-pruned-emaonly.safetensors)"
SINGLE_FILE = ("ldm-jax reads CompVis single-file checkpoints (model.diffusion_model.*, first_stage_model.*, "
               "cond_stage_model.*; e.g. v1-5-pruned-emaonly.safetensors): use the single-file release of this model")

_LORA = re.compile(r"^lora_(unet|te\d?)_|[._](lora_[AB]|lora_embedding_[AB]|lora_down|lora_up|lora_mid|"
                   r"lora_linear_layer|lora)\.")
_KOHYA = re.compile(r"^lora_(unet|te)_.*\.(lora_down|lora_up)\.weight$")  # what `convert.lora` merges
_OTHER_LORA = re.compile(r"^lora_te\d_|\.(hada_|lokr_|lora_mid|dora_scale)|[._](lora_[AB]|lora_linear_layer|lora)\.")
_CONTROLNET = re.compile(r"^control_model\.|^(control_model\.)?(input_hint_block|zero_convs|middle_block_out)\.|"
                         r"^controlnet_(cond_embedding|down_blocks|mid_block)\.")
_VAE = re.compile(r"^(first_stage_model\.)?((encoder|decoder)\.(conv_in|down|up|mid|norm_out|conv_out)\.|"
                  r"(post_)?quant_conv\.)")
_DIFFUSERS_VAE = re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks|mid_block|conv_norm_out)\.")
_DIFFUSERS_UNET = re.compile(r"^(conv_in|time_embedding|down_blocks|mid_block|up_blocks|conv_norm_out)\.")
_EMBEDDING_WIDTHS = (768, 1024, 1280)  # CLIP-L (SD 1.x), OpenCLIP-H (SD 2.x), OpenCLIP-bigG (SDXL)


def _first(keys, rx):
    return next((k for k in keys if rx.search(k)), None)


def _shape(value):
    return tuple(getattr(value, "shape", ()))


def _is_embedding(sd: Mapping[str, object]) -> bool:
    keys = set(sd)
    if "emb_params" in keys or any(k.startswith(("string_to_param", "string_to_token")) for k in keys):
        return True
    if keys and keys <= {"clip_l", "clip_g"}:
        return True
    if len(keys) != 1:
        return False
    (key,) = keys  # diffusers learned_embeds: one [n, width] (or [width]) tensor named after its token
    shape = _shape(sd[key])
    return "." not in key and len(shape) in (1, 2) and shape[-1] in _EMBEDDING_WIDTHS


def describe(sd: Mapping[str, object]) -> str | None:
    """One line naming what the (flat, key-normalised) state dict is when it is a known kind of file that is not
    a full Stable Diffusion checkpoint; None when it looks like one (or is unknown: `detect_kind` says more)."""
    keys = list(sd)
    control = _first(keys, _CONTROLNET)
    if control is not None:
        bundled = " (bundled with its base model)" if any(k.startswith(UNET) for k in keys) else ""
        return (f"this file is a ControlNet{bundled} ({control}), not a Stable Diffusion checkpoint; ControlNets "
                f"are not supported yet: {BASE}")
    if any(k.startswith(UNET) for k in keys):
        return None
    lora = _first(keys, _LORA)
    if lora is not None:
        kohya = _KOHYA.search(lora) and not any(_OTHER_LORA.search(k) for k in keys)
        note = "" if kohya else (" (kohya-ss SD 1.x LoRA/LoCon files only: LyCORIS LoHa/LoKr, SDXL and "
                                 "diffusers/PEFT-format LoRAs are not supported yet)")
        return (f"this file is a LoRA ({lora}), not a full checkpoint; pass it with --lora FILE[:SCALE] (or "
                f"ldm_jax.load(..., loras=)) next to a full Stable Diffusion checkpoint{note}")
    if _is_embedding(sd):
        return (f"this file is a textual-inversion embedding ({', '.join(keys[:2])}), not a checkpoint; embeddings "
                f"are not supported yet: {BASE}")
    found = _first(keys, _DIFFUSERS_VAE)
    if found is not None:
        return (f"this file is a diffusers-layout autoencoder (AutoencoderKL: {found}), not a full checkpoint; "
                f"{SINGLE_FILE}, and give --vae a CompVis-layout VAE file "
                f"(e.g. vae-ft-mse-840000-ema-pruned.safetensors)")
    found = _first(keys, _VAE)
    if found is not None and not any(k.startswith("cond_stage_model.") for k in keys):
        return (f"this file is an autoencoder (VAE) file ({found}), not a full checkpoint; pass it with --vae "
                f"(or ldm_jax.load(..., vae=)) next to a full Stable Diffusion checkpoint")
    found = _first(keys, _DIFFUSERS_UNET)
    if found is not None:
        return (f"this file is a diffusers UNet2DConditionModel ({found}), one component of a diffusers pipeline; "
                f"{SINGLE_FILE}")
    found = next((k for k in keys if k.startswith("text_model.")), None)
    if found is not None:
        return (f"this file is a CLIP text encoder on its own (transformers CLIPTextModel: {found}), one component "
                f"of a diffusers pipeline; {SINGLE_FILE}")
    return None


def describe_container(obj: Mapping) -> str | None:
    """One line for a torch file whose top-level dict is not a state dict but a known kind of file (an A1111
    textual-inversion embedding or hypernetwork); None otherwise."""
    keys = [k for k in obj if isinstance(k, str)]
    if any(k in ("string_to_param", "string_to_token") for k in keys):
        return (f"is a textual-inversion embedding (string_to_param, string_to_token), not a checkpoint; embeddings "
                f"are not supported yet: {BASE}")
    if "layer_structure" in keys or "activation_func" in keys:
        return f"is a hypernetwork (layer_structure), not a checkpoint; hypernetworks are not supported: {BASE}"
    return None


def describe_directory(path: str) -> str | None:
    """One line for a folder that is a diffusers pipeline or a diffusers/transformers model folder; None otherwise.
    Looks at file names only."""
    try:
        names = set(os.listdir(path))
    except OSError:
        return None
    parts = [n + "/" for n in ("unet", "vae", "text_encoder") if os.path.isdir(os.path.join(path, n))]
    if "model_index.json" in names or len(parts) >= 2:
        found = ", ".join((["model_index.json"] if "model_index.json" in names else []) + parts)
        return (f"is a diffusers pipeline folder ({found}), not a checkpoint file; {SINGLE_FILE}, or make one with "
                f"diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py")
    weights = sorted(n for n in names if n.startswith(("diffusion_pytorch_model", "model.", "pytorch_model"))
                     and n.endswith((".safetensors", ".bin")))
    if "config.json" in names and weights:
        return (f"is a diffusers/transformers model folder (config.json, {weights[0]}): one component of a diffusers "
                f"pipeline, not a checkpoint file; {SINGLE_FILE}")
    return None
