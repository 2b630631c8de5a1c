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
* T2I-Adapter (TencentARC `ldm/modules/encoders/adapter.py`: `Adapter` `conv_in`, `body.N.{in_conv,block1,block2,
  skep,down_opt}`; `Adapter_light` `body.N.{in_conv,out_conv}`, `body.N.body.M.block1`; `StyleAdapter`
  `style_embedding`, `transformer_layes.*` [sic]; `CoAdapterFuser` `spatial_feat_mapping.*`, `transformer_layes.*`);
  diffusers `models/adapter.py` `T2IAdapter`: `adapter.conv_in`, `adapter.body.N.resnets.M.block1`,
  `adapter.body.N.in_conv` (ComfyUI `comfy/controlnet.py` `load_t2i_adapter` tests the same names).
* IP-Adapter (tencent-ailab; h94/IP-Adapter): a `.bin` holds `{"image_proj": {proj.weight, norm.weight | latents,
  proj_in.*, layers.*}, "ip_adapter": {"1.to_k_ip.weight", ...}}`; `.safetensors` flattens it to `image_proj.*`,
  `ip_adapter.*` (ComfyUI_IPAdapter_plus, diffusers `loaders/ip_adapter.py` read those names).
* Image upscalers (chaiNNer spandrel `architectures/*/__init__.py` detection keys): ESRGAN `model.0.weight` +
  `model.1.sub.0.RDB1.conv1.0.weight`; Real-ESRGAN / BasicSR RRDBNet `conv_first`, `body.N.rdbK.convJ`,
  `conv_body`; BSRGAN `RRDB_trunk.N.RDBK`; Real-ESRGAN compact (SRVGGNetCompact) only `body.N.weight|bias`; SwinIR
  `layers.N.residual_group.blocks.M.*`. Such `.pth` files usually wrap the weights in `params_ema` / `params`.
  Stable Diffusion's x4 upscaler (Stability-AI/stablediffusion `x4-upscaling.yaml`, LatentUpscaleDiffusion): a U-Net
  with 7 input channels (4 latent + 3 low-resolution image) and `low_scale_model.*` noise-schedule buffers.
* CLIP image encoders: transformers `CLIPVisionModel(WithProjection)` `vision_model.*`, `visual_projection.weight`;
  OpenCLIP `visual.conv1.weight`, `visual.transformer.resblocks.*` (ComfyUI `comfy/clip_vision.py`); a full
  transformers `CLIPModel` has `text_model.*` and `vision_model.*`.
* AnimateDiff motion modules: `down_blocks.N.motion_modules.M.temporal_transformer.*` (diffusers
  `loaders/single_file_utils.py` CHECKPOINT_KEY_NAMES "animatediff").
* Other model families (same CHECKPOINT_KEY_NAMES and ComfyUI `comfy/model_detection.py`), bare or under
  `model.diffusion_model.`: SD3/3.5 `joint_blocks.N.{context_block,x_block}.*`; Flux `double_blocks.N.img_attn.*`,
  `single_blocks.N.linear1.*`; HunyuanVideo `txt_in.individual_token_refiner.*`; AuraFlow
  `double_layers.N.attn.w1q.*`; Hunyuan-DiT `mlp_t5.0.*`; PixArt-alpha/sigma and Sana `y_embedder.y_proj.fc1.*`
  (diffusers `scripts/convert_pixart_alpha_to_diffusers.py`); Stable Cascade `clf.1.*`, `clip_txt_mapper.*`,
  `clip_mapper.*`; Stable Video Diffusion `input_blocks.N.M.time_stack.*`. SD 2.x and SDXL are named by
  `convert.detect` (they share SD 1.x's U-Net layout).
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
_KOHYA = re.compile(r"^lora_(unet|te[12]?)_.*\.(lora_down|lora_up)\.weight$")  # what `convert.lora` merges
_OTHER_LORA = re.compile(r"\.dora_scale|[._](lora_[AB]|lora_linear_layer|lora)\.")  # what --lora refuses
_CONTROLNET = re.compile(r"^control_model\.|^(control_model\.)?(input_hint_block|zero_convs|middle_block_out)\.|"
                         r"^controlnet_(cond_embedding|down_blocks|mid_block)\.")
_VAE = re.compile(r"^(first_stage_model\.)?((encoder|decoder)\.(conv_in|down|up|mid|norm_out|conv_out)\.|"
                  r"(post_)?quant_conv\.)")
_DIFFUSERS_VAE = re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks|mid_block|conv_norm_out)\.")
_DIFFUSERS_UNET = re.compile(r"^(conv_in|time_embedding|down_blocks|mid_block|up_blocks|conv_norm_out)\.")
_EMBEDDING_WIDTHS = (768, 1024, 1280)  # CLIP-L (SD 1.x), OpenCLIP-H (SD 2.x), OpenCLIP-bigG (SDXL)
_EMBEDDING_USE = "pass it with --embedding FILE[:TOKEN] (or ldm_jax.load(..., embeddings=)) next to a full {}"
EMBEDDING_USE = _EMBEDDING_USE.format("Stable Diffusion checkpoint")
SDXL_EMBEDDING_USE = _EMBEDDING_USE.format("Stable Diffusion XL checkpoint (e.g. sd_xl_base_1.0.safetensors)")
SUPPORTED = ("ldm-jax supports Stable Diffusion 1.x and 2.x checkpoints (e.g. v1-5-pruned-emaonly.safetensors, "
             "sd-v1-5-inpainting.ckpt or v2-1_768-ema-pruned.safetensors) and SDXL 1.0 base "
             "(sd_xl_base_1.0.safetensors)")

_IP_ADAPTER = re.compile(r"^(image_proj|ip_adapter)\.")
_T2I_ADAPTER = re.compile(r"^(adapter\.)?body\.\d+\.((resnets|body)\.\d+\.)?(block1|block2|in_conv|out_conv|skep|"
                          r"down_opt)\.|^style_embedding$|^(transformer_layes|spatial_feat_mapping|spatial_ch_projs)\.")
_UPSCALERS = (  # (key pattern, what the file is, its network)
    (re.compile(r"^(model\.\d+\.sub\.\d+\.RDB\d|body\.\d+\.rdb\d|RRDB_trunk\.\d+\.RDB\d)\."),
     "an ESRGAN / Real-ESRGAN image upscaler", "RRDBNet"),
    (re.compile(r"^layers\.\d+\.residual_group\.blocks\.\d+\."), "a SwinIR image upscaler", "Swin transformer"),
)
_COMPACT = re.compile(r"^body\.\d+\.(weight|bias)$")  # Real-ESRGAN compact: nothing but body.N.weight / .bias
_MOTION = re.compile(r"^(down_blocks|mid_block|up_blocks)\.(\d+\.)?motion_modules\.")
_ARCHITECTURES = (  # other model families, bare or under model.diffusion_model.; first match wins
    (re.compile(r"joint_blocks\.\d+\.(context_block|x_block)\."), "a Stable Diffusion 3 / 3.5 (MMDiT)"),
    (re.compile(r"txt_in\.individual_token_refiner\."), "a HunyuanVideo"),
    (re.compile(r"(double_blocks\.\d+\.img_attn|single_blocks\.\d+\.linear1)\."), "a Flux"),
    (re.compile(r"double_layers\.\d+\.attn\.w1q\."), "an AuraFlow"),
    (re.compile(r"mlp_t5\.0\."), "a Hunyuan-DiT"),
    (re.compile(r"y_embedder\.y_proj\.fc1\."), "a PixArt / Sana (DiT)"),
    (re.compile(r"(clf\.1|clip_txt_mapper|clip_mapper)\."), "a Stable Cascade"),
    (re.compile(r"(input|output)_blocks\.\d+\.\d+\.time_stack\."), "a Stable Video Diffusion"),
)
_ARCH_PREFIX = re.compile(r"^(model\.diffusion_model\.)?")
# torch files that wrap a state dict in another key (spandrel canonicalize_state_dict; ComfyUI load_t2i_adapter)
_WRAPPERS = ("params_ema", "params-ema", "params", "model_state_dict", "model", "net", "adapter")


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


def _other_architecture(sd: Mapping[str, object], keys: list[str]) -> str | None:
    """A model family other than SD 1.x/2.x/XL (keys bare or under model.diffusion_model.), or the SD x4 upscaler."""
    for rx, name in _ARCHITECTURES:
        found = next((k for k in keys if rx.match(k, _ARCH_PREFIX.match(k).end()) and not _LORA.search(k)), None)
        if found is not None:
            return f"this file is {name} model ({found}), not a Stable Diffusion 1.x/2.x/XL checkpoint; {SUPPORTED}"
    first = _shape(sd.get(UNET + "input_blocks.0.0.weight"))
    found = next((k for k in keys if k.startswith("low_scale_model.")), None)
    if found is not None or (len(first) == 4 and first[1] == 7):
        evidence = found or f"{UNET}input_blocks.0.0.weight: 7 input channels"
        return (f"this file is the Stable Diffusion x4 upscaler ({evidence}), an SD 2.x image upscaler (a U-Net over "
                f"latents + the low-resolution image, with a noise-level embedding), not a text-to-image checkpoint; "
                f"{SUPPORTED}")
    return None


def _add_on(sd: Mapping[str, object], keys: list[str]) -> str | None:
    """An IP-Adapter, a T2I-Adapter or an image upscaler (ESRGAN, Real-ESRGAN, SwinIR)."""
    found = _first(keys, _IP_ADAPTER)
    if found is not None:
        return (f"this file is an IP-Adapter ({found}: image-prompt adapter weights), not a Stable Diffusion "
                f"checkpoint; IP-Adapters are not supported: {BASE}")
    found = _first(keys, _T2I_ADAPTER)
    if found is not None:
        return (f"this file is a T2I-Adapter ({found}), not a Stable Diffusion checkpoint; T2I-Adapters are not "
                f"supported: {BASE}")
    for rx, name, network in _UPSCALERS:
        found = _first(keys, rx)
        if found is not None:
            break
    else:
        name, network = "a Real-ESRGAN compact image upscaler", "SRVGGNetCompact"
        layers = {k.split(".")[1] for k in keys if _COMPACT.match(k)}
        found = keys[0] if len(layers) >= 2 and all(_COMPACT.match(k) for k in keys) else None
    if found is not None:
        return (f"this file is {name} ({network}: {found}), not a Stable Diffusion checkpoint; image upscalers are "
                f"not supported: {SUPPORTED}")
    return None


def _clip_vision(keys: list[str]) -> str | None:
    """A CLIP image encoder (transformers or OpenCLIP), alone or in a full CLIP model."""
    vision = next((k for k in keys if k.startswith(("vision_model.", "visual_projection.", "visual."))), None)
    if vision is None:
        return None
    text = next((k for k in keys if k.startswith(("text_model.", "token_embedding.", "transformer.resblocks."))), None)
    what = (f"a full CLIP model (text and image encoders: {text}, {vision})" if text is not None else
            f"a CLIP image encoder ({vision}), as used by IP-Adapters and unCLIP")
    return (f"this file is {what}, not a Stable Diffusion checkpoint; ldm-jax uses the text encoder inside a "
            f"Stable Diffusion checkpoint: {BASE}")


def describe(sd: Mapping[str, object]) -> str | None:
    """One line naming what the (flat, key-normalised) state dict is when it is a known kind of file that is not
    a full Stable Diffusion checkpoint; None when it looks like one (or is unknown: `detect_kind` says more)."""
    keys = list(sd)
    control = _first(keys, _CONTROLNET)
    if control is not None:
        bundled = " (bundled with its base model)" if any(k.startswith(UNET) for k in keys) else ""
        return (f"this file is a ControlNet{bundled} ({control}), not a Stable Diffusion checkpoint; ControlNets "
                f"are not supported yet: {BASE}")
    other = _other_architecture(sd, keys)
    if other is not None:
        return other
    if any(k.startswith(UNET) for k in keys):
        return None
    add_on = _add_on(sd, keys)
    if add_on is not None:
        return add_on
    lora = _first(keys, _LORA)
    if lora is not None:
        kohya = _KOHYA.search(lora) and not any(_OTHER_LORA.search(k) for k in keys)
        note = "" if kohya else (" (kohya-ss LoRA/LoCon and LyCORIS LoHa/LoKr files only, SD 1.x/2.x and SDXL: "
                                 "DoRA and diffusers/PEFT-format LoRAs are not supported yet)")
        return (f"this file is a LoRA ({lora}), not a full checkpoint; pass it with --lora FILE[:SCALE] (or "
                f"ldm_jax.load(..., loras=)) next to a full Stable Diffusion checkpoint{note}")
    if _is_embedding(sd):
        if set(keys) <= {"clip_l", "clip_g"}:
            return (f"this file is an SDXL textual-inversion embedding ({', '.join(keys[:2])}), not a checkpoint; "
                    f"{SDXL_EMBEDDING_USE}")
        return f"this file is a textual-inversion embedding ({', '.join(keys[:2])}), not a checkpoint; {EMBEDDING_USE}"
    found = _first(keys, _DIFFUSERS_VAE)
    if found is not None:
        return (f"this file is a diffusers-layout autoencoder (AutoencoderKL: {found}), not a full checkpoint; "
                f"{SINGLE_FILE}, and give --vae a CompVis-layout VAE file "
                f"(e.g. vae-ft-mse-840000-ema-pruned.safetensors)")
    found = _first(keys, _VAE)
    if found is not None and not any(k.startswith("cond_stage_model.") for k in keys):
        return (f"this file is an autoencoder (VAE) file ({found}), not a full checkpoint; pass it with --vae "
                f"(or ldm_jax.load(..., vae=)) next to a full Stable Diffusion checkpoint")
    found = _first(keys, _MOTION)
    if found is not None:
        return (f"this file is an AnimateDiff motion module ({found}), not a Stable Diffusion checkpoint; "
                f"AnimateDiff is not supported: {BASE}")
    found = _first(keys, _DIFFUSERS_UNET)
    if found is not None:
        return (f"this file is a diffusers UNet2DConditionModel ({found}), one component of a diffusers pipeline; "
                f"{SINGLE_FILE}")
    clip_vision = _clip_vision(keys)
    if clip_vision is not None:
        return clip_vision
    found = next((k for k in keys if k.startswith("text_model.")), None)
    if found is not None:
        return (f"this file is a CLIP text encoder on its own (transformers CLIPTextModel: {found}), one component "
                f"of a diffusers pipeline; {SINGLE_FILE}")
    return None


def describe_container(obj: Mapping) -> str | None:
    """One line for a torch file whose top-level dict is not a state dict but a known kind of file (an A1111 or
    rinongal textual-inversion embedding, a hypernetwork, an IP-Adapter's nested dicts, or a known kind of state
    dict wrapped in `params_ema`, `params`, ...); None otherwise. Looks at key names only."""
    keys = [k for k in obj if isinstance(k, str)]
    if any(k in ("string_to_param", "string_to_token") for k in keys):
        return f"is a textual-inversion embedding (string_to_param, string_to_token), not a checkpoint; {EMBEDDING_USE}"
    if "layer_structure" in keys or "activation_func" in keys:
        return f"is a hypernetwork (layer_structure), not a checkpoint; hypernetworks are not supported: {BASE}"
    nested = {f"{k}.{name}": None for k in ("image_proj", "ip_adapter") if isinstance(obj.get(k), Mapping)
              for name in obj[k] if isinstance(name, str)}
    for key in _WRAPPERS:
        if not nested and isinstance(obj.get(key), Mapping):
            nested = {name: value for name, value in obj[key].items() if isinstance(name, str)}
    found = describe(nested) if nested else None
    return found[len("this file "):] if found is not None and found.startswith("this file ") else found


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
