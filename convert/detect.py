"""Recognise what a CompVis state dict holds and infer its ModelConfig from tensor shapes.

Facts used (DESIGN.md §6): a 9-channel first conv is the inpainting U-Net; `cond_stage_model.model.*`
(OpenCLIP) or a 1024-wide cross-attention context is SD 2.x; `conditioner.embedders.*` is SDXL.
Head counts are not visible in shapes: SD 1.x uses 8 heads per transformer and CLIP heads of width 64; SD 2.x
heads of width 64 in both (OpenCLIP text tower: exact GELU, read at its penultimate layer, padded with 0).
Whether an SD 2.x U-Net predicts eps or v is not visible either: `convert.prediction` (ComfyUI's weight test).
Other kinds of file users pass by mistake (LoRA, embeddings, a VAE, diffusers components, ControlNet) are named by
`convert.file_kinds` (which also names SD3, Flux and other model families and the SD x4 upscaler); an 8-channel
first conv is InstructPix2Pix. Every refusal is one line naming the kind; SDXL ones add what ldm-jax supports.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from convert.errors import CheckpointError
from convert.file_kinds import SUPPORTED, describe
from convert.open_clip_keys import PREFIX as OC
from convert.prediction import SD2_NAME, check_prediction, infer_prediction, sd2_flavour, with_prediction
from ldm_jax.configs import AutoencoderConfig, ModelConfig, TextEncoderConfig, UNetConfig

U = "model.diffusion_model."
V = "first_stage_model."
T = "cond_stage_model.transformer.text_model."


def detect_kind(sd: Mapping[str, object], prediction: str | None = None) -> str:
    """'sd1', 'sd1-inpaint', 'sd2', 'sd2-v' (`convert.prediction`; `prediction` given: 'sd2' for eps, 'sd2-v' for v)
    or 'sd2-inpaint'; raises CheckpointError naming any other recognised or unknown kind."""
    check_prediction(prediction)
    keys = sd.keys()
    wrong = describe(sd)
    if wrong is not None:
        raise CheckpointError(wrong)
    found = next((k for k in keys if k.startswith("conditioner.embedders.")), None)
    if found is not None:
        raise CheckpointError(f"SDXL checkpoints are not supported yet: this file is a Stable Diffusion XL model "
                              f"({found}: the SDXL text-encoder stack), not SD 1.x or 2.x; {SUPPORTED}")
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


def _indices(sd, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})


def _shape(sd, key):
    if key not in sd:
        raise CheckpointError(f"missing tensor {key}")
    return tuple(sd[key].shape)


def infer_unet(sd, sd2: bool = False) -> UNetConfig:
    """SD 1.x: 8 heads per transformer; SD 2.x (sd2): heads of width 64."""
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
    depth = len(_indices(sd, re.escape(mid) + r"transformer_blocks\.(\d+)\.norm1\.weight$"))
    return UNetConfig(
        in_channels=_shape(sd, U + "input_blocks.0.0.weight")[1],
        out_channels=_shape(sd, U + "out.2.weight")[0],
        channels=channels, channel_multipliers=tuple(mults), n_res_blocks=n_res, attention_levels=tuple(attn),
        n_heads=None if sd2 else 8, d_head=64 if sd2 else None, tf_layers=max(depth, 1),
        d_cond=_shape(sd, mid + "transformer_blocks.0.attn2.to_k.weight")[1],
        use_linear_proj=len(_shape(sd, mid + "proj_in.weight")) == 2,
    )


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


def infer_text(sd) -> TextEncoderConfig:
    vocab, hidden = _shape(sd, T + "embeddings.token_embedding.weight")
    layers = _indices(sd, re.escape(T) + r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.weight$")
    return TextEncoderConfig(
        vocab_size=vocab, hidden_size=hidden, max_length=_shape(sd, T + "embeddings.position_embedding.weight")[0],
        num_layers=len(layers), num_heads=hidden // 64,
        intermediate_size=_shape(sd, T + "encoder.layers.0.mlp.fc1.weight")[0],
    )


def infer_open_clip_text(sd) -> TextEncoderConfig:
    """SD 2.x's OpenCLIP text tower (`convert.open_clip_keys`): heads of width 64, exact GELU, penultimate layer."""
    vocab, hidden = _shape(sd, OC + "token_embedding.weight")
    layers = _indices(sd, re.escape(OC) + r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$")
    return TextEncoderConfig(
        vocab_size=vocab, hidden_size=hidden, max_length=_shape(sd, OC + "positional_embedding")[0],
        num_layers=len(layers), num_heads=hidden // 64,
        intermediate_size=_shape(sd, OC + "transformer.resblocks.0.mlp.c_fc.weight")[0],
        hidden_act="gelu", skip_last_layers=1, pad_token_id=0, key_layout="open_clip",
    )


def infer_config(sd: Mapping[str, object], prediction: str | None = None) -> ModelConfig:
    """The ModelConfig of a (key-normalised) CompVis state dict, SD 1.x / 2.x conventions for what shapes hide.
    prediction: "eps" or "v" instead of what `convert.prediction` infers (SD 2.x: it also sets the name, sd2 or
    sd2-v, and the training resolution, 512 or 768)."""
    check_prediction(prediction)
    kind = detect_kind(sd)
    if not kind.startswith("sd2"):
        config = ModelConfig(name=kind, unet=infer_unet(sd), vae=infer_vae(sd), text=infer_text(sd))
        return config if prediction is None else with_prediction(config, prediction)
    unet = infer_unet(sd, sd2=True)
    prediction = prediction or infer_prediction(sd, True, unet.in_channels)[0]
    return ModelConfig(unet=unet, vae=infer_vae(sd), text=infer_open_clip_text(sd), **sd2_flavour(kind, prediction))


def prediction_note(sd: Mapping[str, object], prediction: str | None = None) -> str | None:
    """For an SD 2.x state dict, one line saying which prediction type its inferred config gets and why (the rule of
    `convert.prediction`, or `prediction` when given); None for other kinds."""
    kind = detect_kind(sd)
    if not kind.startswith("sd2"):
        return None
    if prediction is not None:
        return f"prediction {prediction} (given; not inferred from the weights)"
    return infer_prediction(sd, True, 9 if kind == "sd2-inpaint" else 4)[1]
