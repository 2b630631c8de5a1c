"""Recognise what a CompVis state dict holds and infer its ModelConfig from tensor shapes.

Facts used (DESIGN.md §6): a 9-channel first conv is the inpainting U-Net; `cond_stage_model.model.*`
(OpenCLIP) or a 1024-wide cross-attention context is SD 2.x; `conditioner.embedders.*` is sgm's layout
(Stability-AI/generative-models): SDXL base when embedder 0 is CLIP ViT-L (`.0.transformer.`), embedder 1 OpenCLIP
bigG (`.1.model.`) and the U-Net has `label_emb` (the vector conditioning, `adm_in_channels`); the SDXL refiner
(`sd_xl_refiner.yaml`) has only an OpenCLIP embedder at index 0 and a 2560-wide `label_emb`; sgm's SD 2.1 configs
(`sd_2_1*.yaml`) the OpenCLIP embedder at index 0 and no `label_emb`. SDXL's heads are 64 wide everywhere, its
transformer depth differs per level (counted: `tf_layers_by_level`) and the middle block takes the last level's;
the refiner's is 4 wherever there is attention, the middle block included (its last level has none).
Head counts are not visible in shapes: SD 1.x uses 8 heads per transformer and CLIP heads of width 64; SD 2.x
heads of width 64 in both (OpenCLIP text tower: exact GELU, read at its penultimate layer, padded with 0).
Whether an SD 2.x U-Net predicts eps or v is not visible either: `convert.prediction` (ComfyUI's weight test).
Other kinds of file users pass by mistake (LoRA, embeddings, a VAE, diffusers components, ControlNet) are named by
`convert.file_kinds` (which also names SD3, Flux and other model families and the SD x4 upscaler); an 8-channel
first conv is InstructPix2Pix. Every refusal is one line naming the kind; sgm-layout ones say what to use instead.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from convert.errors import CheckpointError
from convert.file_kinds import SUPPORTED, describe
from convert.keys import SGM_CONDITIONER, SGM_PREFIXES
from convert.open_clip_keys import PREFIX as OC
from convert.prediction import SD2_NAME, check_prediction, infer_prediction, sd2_flavour, with_prediction
from ldm_jax.configs import AutoencoderConfig, ModelConfig, TextEncoderConfig, UNetConfig
from ldm_jax.configs import sdxl as sdxl_preset
from ldm_jax.configs import sdxl_refiner as sdxl_refiner_preset

U = "model.diffusion_model."
V = "first_stage_model."
T = "cond_stage_model.transformer.text_model."
XL_T, XL_OC = SGM_PREFIXES["text_encoder"], SGM_PREFIXES["text_encoder_2"]  # SDXL base: CLIP ViT-L, OpenCLIP bigG
SGM_OC0 = SGM_CONDITIONER + "0.model."  # an OpenCLIP embedder first: the SDXL refiner, or sgm's SD 2.1
LABEL_EMB = U + "label_emb.0.0.weight"  # the vector conditioning's first Linear [time_embed_dim, adm_in_channels]


def detect_kind(sd: Mapping[str, object], prediction: str | None = None) -> str:
    """'sd1', 'sd1-inpaint', 'sd2', 'sd2-v' (`convert.prediction`; `prediction` given: 'sd2' for eps, 'sd2-v' for v),
    'sd2-inpaint', 'sdxl', 'sdxl-inpaint' or 'sdxl-refiner'; raises CheckpointError naming any other recognised or
    unknown kind."""
    check_prediction(prediction)
    keys = sd.keys()
    wrong = describe(sd)
    if wrong is not None:
        raise CheckpointError(wrong)
    found = next((k for k in keys if k.startswith(SGM_CONDITIONER)), None)
    if found is not None:
        return _sgm_kind(sd, found)
    ctx = {sd[k].shape[-1] for k in keys if k.startswith(U) and k.endswith("attn2.to_k.weight")
           and hasattr(sd[k], "shape")}
    open_clip = next((k for k in keys if k.startswith(OC)), None)
    sd2 = open_clip is not None or 1024 in ctx
    first = U + "input_blocks.0.0.weight"
    if first not in sd or not any(k.startswith(V) for k in keys):
        raise CheckpointError("not a Stable Diffusion checkpoint (no U-Net/autoencoder tensors of the CompVis layout)")
    clip = next((k for k in keys if k.startswith("cond_stage_model.transformer.")), None)
    if sd2 and open_clip is None:
        raise CheckpointError("incomplete SD 2.x checkpoint: a Stable Diffusion 2.x U-Net (1024-wide cross-attention "
                              "context, attn2.to_k) without its OpenCLIP text encoder (cond_stage_model.model.*)")
    if open_clip is not None and clip is not None:
        raise CheckpointError(f"this file holds two text encoders, SD 2.x's OpenCLIP ({open_clip}) and SD 1.x's CLIP "
                              f"({clip}); not a checkpoint ldm-jax can read")
    if not sd2 and clip is None:
        raise CheckpointError("unsupported checkpoint: no CLIP text encoder (cond_stage_model.transformer.*)")
    c_in = sd[first].shape[1]
    if c_in == 4:
        return SD2_NAME[prediction or infer_prediction(sd, True, 4)[0]] if sd2 else "sd1"
    if c_in == 9:
        return "sd2-inpaint" if sd2 else "sd1-inpaint"
    if c_in == 8:
        raise CheckpointError("this file is an InstructPix2Pix U-Net (8 input channels: latents and the encoded input "
                              "image); instruct-pix2pix checkpoints are not supported yet")
    raise CheckpointError(f"unsupported U-Net with {c_in} input channels")


def _sgm_kind(sd: Mapping[str, object], found: str) -> str:
    """'sdxl' for an SDXL base checkpoint in sgm's layout (`found`: one of its conditioner.embedders.* keys),
    'sdxl-inpaint' for its 9-channel inpainting U-Net, 'sdxl-refiner' for the refiner (`sd_xl_refiner.yaml`:
    OpenCLIP bigG alone, at embedder 0, and label_emb); one CheckpointError line naming any other sgm-layout kind
    (SD 2.1, incomplete or mixed)."""
    _refuse_other_sgm(sd, found)
    if any(k.startswith(SGM_OC0) for k in sd):  # OpenCLIP at embedder 0 with label_emb (else refused above)
        c_in = _shape(sd, U + "input_blocks.0.0.weight")[1]
        if c_in != 4:
            raise CheckpointError(f"unsupported SDXL refiner U-Net with {c_in} input channels")
        return "sdxl-refiner"
    missing = [p + "*" for p in (XL_T, XL_OC) if not any(k.startswith(p) for k in sd)]
    if LABEL_EMB not in sd:
        missing.append(LABEL_EMB)
    if missing:
        raise CheckpointError(f"incomplete SDXL checkpoint: {found} is sgm's layout, but {', '.join(missing)} "
                              f"{'is' if len(missing) == 1 else 'are'} missing (SDXL base: two text encoders and the "
                              f"U-Net's vector conditioning)")
    c_in = _shape(sd, U + "input_blocks.0.0.weight")[1]
    if c_in not in (4, 9):
        raise CheckpointError(f"unsupported SDXL U-Net with {c_in} input channels")
    return "sdxl" if c_in == 4 else "sdxl-inpaint"  # 9: latents, mask and masked-image latents


def _refuse_other_sgm(sd: Mapping[str, object], found: str) -> None:
    """Mixed layouts, no U-Net or VAE and sgm's SD 2.1 (`sd_2_1*.yaml`: OpenCLIP at embedder 0 like the SDXL
    refiner, but no label_emb): one CheckpointError line each."""
    other = next((k for k in sd if k.startswith("cond_stage_model.")), None)
    if other is not None:
        raise CheckpointError(f"this file holds text encoders of two layouts, SDXL's ({found}) and SD 1.x/2.x's "
                              f"({other}); not a checkpoint ldm-jax can read: {SUPPORTED}")
    if U + "input_blocks.0.0.weight" not in sd or not any(k.startswith(V) for k in sd):
        raise CheckpointError(f"not a Stable Diffusion checkpoint: text encoders in sgm's layout ({found}) but no "
                              "U-Net/autoencoder tensors (model.diffusion_model.*, first_stage_model.*)")
    open_clip_first = next((k for k in sd if k.startswith(SGM_OC0)), None)
    if open_clip_first is not None and LABEL_EMB not in sd:
        raise CheckpointError(f"this file is a Stable Diffusion 2.x model in sgm's layout ({open_clip_first}: "
                              f"Stability-AI/generative-models); sgm-layout SD 2.x checkpoints are not supported yet: "
                              f"use its CompVis-layout release (e.g. v2-1_768-ema-pruned.safetensors)")


def _indices(sd, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})


def _shape(sd, key):
    if key not in sd:
        raise CheckpointError(f"missing tensor {key}")
    return tuple(sd[key].shape)


def infer_unet(sd, sd2: bool = False, sdxl: bool = False) -> UNetConfig:
    """SD 1.x: 8 heads per transformer; SD 2.x (sd2): heads of width 64; SDXL (sdxl): heads of width 64, a depth per
    level (`tf_layers_by_level`) and the vector conditioning's width (`adm_in_channels`)."""
    channels = _shape(sd, U + "input_blocks.0.0.weight")[0]
    res = _indices(sd, re.escape(U) + r"input_blocks\.(\d+)\.0\.in_layers\.2\.weight$")
    downs = _indices(sd, re.escape(U) + r"input_blocks\.(\d+)\.0\.op\.weight$")
    levels = len(downs) + 1
    if not res or len(res) % levels:
        raise CheckpointError("cannot infer the U-Net layout from the checkpoint's input_blocks")
    n_res = len(res) // levels
    mults, attn = [], []
    for level in range(levels):
        b = 1 + level * (n_res + 1)
        mults.append(_shape(sd, f"{U}input_blocks.{b}.0.in_layers.2.weight")[0] // channels)
        if f"{U}input_blocks.{b}.1.proj_in.weight" in sd:
            attn.append(level)
    mid = U + "middle_block.1."
    depth = _depth(sd, mid)
    per_level, tf_layers = {}, max(depth, 1)
    if sdxl:
        per_level = {"adm_in_channels": _shape(sd, LABEL_EMB)[1]}
        depths = _depths_by_level(sd, levels, n_res)
        if depth == depths[-1]:  # SDXL base: (0, 2, 10), the middle block as the last level
            per_level["tf_layers_by_level"], tf_layers = depths, 1
        elif {depths[i] for i in attn} != {depth}:  # the refiner: one depth (4) everywhere there is attention
            raise CheckpointError(f"the U-Net's middle block has {depth} transformer blocks, its levels "
                                  f"{depths}; ldm-jax builds SDXL U-Nets whose middle block has the last level's "
                                  "depth, or one depth everywhere there is attention (the refiner)")
    return UNetConfig(
        in_channels=_shape(sd, U + "input_blocks.0.0.weight")[1],
        out_channels=_shape(sd, U + "out.2.weight")[0],
        channels=channels, channel_multipliers=tuple(mults), n_res_blocks=n_res, attention_levels=tuple(attn),
        n_heads=None if sd2 or sdxl else 8, d_head=64 if sd2 or sdxl else None,
        tf_layers=tf_layers,
        d_cond=_shape(sd, mid + "transformer_blocks.0.attn2.to_k.weight")[1],
        use_linear_proj=len(_shape(sd, mid + "proj_in.weight")) == 2, **per_level,
    )


def _depth(sd, block: str) -> int:
    """The number of transformer blocks of the SpatialTransformer whose keys start with `block` (0: none)."""
    return len(_indices(sd, re.escape(block) + r"transformer_blocks\.(\d+)\.norm1\.weight$"))


def _depths_by_level(sd, levels: int, n_res: int) -> tuple[int, ...]:
    """SDXL's transformer depth per level (sgm `transformer_depth`), read from every input and output block of the
    level (they must agree)."""
    depths = []
    for level in range(levels):
        blocks = [f"{U}input_blocks.{1 + level * (n_res + 1) + i}.1." for i in range(n_res)]
        blocks += [f"{U}output_blocks.{(levels - 1 - level) * (n_res + 1) + i}.1." for i in range(n_res + 1)]
        found = {b: _depth(sd, b) for b in blocks}
        if len(set(found.values())) != 1:
            raise CheckpointError(f"the U-Net's transformer depths differ within level {level} "
                                  f"({', '.join(f'{b}*: {d}' for b, d in found.items())}); an architecture ldm-jax "
                                  "does not build (a distilled SDXL such as SSD-1B?)")
        depths.append(found[blocks[0]])
    return tuple(depths)


def infer_vae(sd) -> AutoencoderConfig:
    e = V + "encoder."
    channels, in_channels = _shape(sd, e + "conv_in.weight")[:2]
    levels = _indices(sd, re.escape(e) + r"down\.(\d+)\.block\.0\.conv1\.weight$")
    blocks = _indices(sd, re.escape(e) + r"down\.0\.block\.(\d+)\.conv1\.weight$")
    return AutoencoderConfig(
        channels=channels, in_channels=in_channels,
        channel_multipliers=tuple(_shape(sd, f"{e}down.{i}.block.0.conv1.weight")[0] // channels for i in levels),
        n_resnet_blocks=len(blocks), out_channels=_shape(sd, V + "decoder.conv_out.weight")[0],
        z_channels=_shape(sd, e + "conv_out.weight")[0] // 2, emb_channels=_shape(sd, V + "quant_conv.weight")[0] // 2,
    )


def infer_text(sd, prefix: str = T) -> TextEncoderConfig:
    """CLIP ViT-L-style text tower under transformers' names after `prefix`: heads of width 64."""
    vocab, hidden = _shape(sd, prefix + "embeddings.token_embedding.weight")
    layers = _indices(sd, re.escape(prefix) + r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.weight$")
    return TextEncoderConfig(
        vocab_size=vocab, hidden_size=hidden, max_length=_shape(sd, prefix + "embeddings.position_embedding.weight")[0],
        num_layers=len(layers), num_heads=hidden // 64,
        intermediate_size=_shape(sd, prefix + "encoder.layers.0.mlp.fc1.weight")[0],
    )


def infer_open_clip_text(sd, prefix: str = OC) -> TextEncoderConfig:
    """SD 2.x's OpenCLIP text tower (`convert.open_clip_keys`): heads of width 64, exact GELU, penultimate layer."""
    vocab, hidden = _shape(sd, prefix + "token_embedding.weight")
    layers = _indices(sd, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$")
    return TextEncoderConfig(
        vocab_size=vocab, hidden_size=hidden, max_length=_shape(sd, prefix + "positional_embedding")[0],
        num_layers=len(layers), num_heads=hidden // 64,
        intermediate_size=_shape(sd, prefix + "transformer.resblocks.0.mlp.c_fc.weight")[0],
        hidden_act="gelu", skip_last_layers=1, pad_token_id=0, key_layout="open_clip",
    )


def infer_config(sd: Mapping[str, object], prediction: str | None = None) -> ModelConfig:
    """The ModelConfig of a (key-normalised) CompVis or sgm (SDXL) state dict, SD 1.x / 2.x / XL conventions for
    what shapes hide.
    prediction: "eps" or "v" instead of what `convert.prediction` infers (SD 2.x: it also sets the name, sd2 or
    sd2-v, and the training resolution, 512 or 768)."""
    check_prediction(prediction)
    kind = detect_kind(sd)
    if kind == "sdxl-refiner":
        return with_prediction(infer_sdxl_refiner(sd), prediction)
    if kind.startswith("sdxl"):
        return with_prediction(infer_sdxl(sd), prediction)
    if not kind.startswith("sd2"):
        config = ModelConfig(name=kind, unet=infer_unet(sd), vae=infer_vae(sd), text=infer_text(sd))
        return config if prediction is None else with_prediction(config, prediction)
    unet = infer_unet(sd, sd2=True)
    prediction = prediction or infer_prediction(sd, True, unet.in_channels)[0]
    return ModelConfig(unet=unet, vae=infer_vae(sd), text=infer_open_clip_text(sd), **sd2_flavour(kind, prediction))


def infer_sdxl(sd) -> ModelConfig:
    """An SDXL base checkpoint's config (sgm `sd_xl_base.yaml`): the shapes as found, the rest as the `sdxl` preset
    (both text towers read at their penultimate layer without the final LayerNorm, the second pooled through its
    `text_projection`; latent scale 0.13025; 1024x1024); named sdxl-inpaint for a 9-channel U-Net."""
    preset = sdxl_preset()
    text = dataclasses.replace(infer_text(sd, XL_T), skip_last_layers=1, norm_skipped_output=False)
    text_2 = dataclasses.replace(infer_open_clip_text(sd, XL_OC), norm_skipped_output=False,
                                 projection_dim=_shape(sd, XL_OC + "text_projection")[1])
    try:
        unet = infer_unet(sd, sdxl=True)
        return dataclasses.replace(preset, name="sdxl-inpaint" if unet.in_channels == 9 else preset.name, unet=unet,
                                   vae=infer_vae(sd), text=text, text_2=text_2)
    except ValueError as e:  # widths that do not fit together (ModelConfig's checks)
        raise CheckpointError(f"inconsistent SDXL checkpoint: {e}") from None


def infer_sdxl_refiner(sd) -> ModelConfig:
    """The SDXL refiner's config (sgm `sd_xl_refiner.yaml`): the shapes as found, the rest as the `sdxl-refiner`
    preset (bigG at its penultimate layer without the final LayerNorm, pooled through `text_projection`)."""
    preset = sdxl_refiner_preset()
    text = dataclasses.replace(infer_open_clip_text(sd, SGM_OC0), norm_skipped_output=False,
                               projection_dim=_shape(sd, SGM_OC0 + "text_projection")[1])
    try:
        return dataclasses.replace(preset, unet=infer_unet(sd, sdxl=True), vae=infer_vae(sd), text=text)
    except ValueError as e:  # widths that do not fit together (ModelConfig's checks)
        raise CheckpointError(f"inconsistent SDXL refiner checkpoint: {e}") from None


def prediction_note(sd: Mapping[str, object], prediction: str | None = None) -> str | None:
    """For an SD 2.x state dict, one line saying which prediction type its inferred config gets and why (the rule of
    `convert.prediction`, or `prediction` when given); None for other kinds."""
    kind = detect_kind(sd)
    if not kind.startswith("sd2"):
        return None
    if prediction is not None:
        return f"prediction {prediction} (given; not inferred from the weights)"
    return infer_prediction(sd, True, 9 if kind == "sd2-inpaint" else 4)[1]
