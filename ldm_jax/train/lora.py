"""LoRA fine-tuning of the U-Net (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), saved as
a kohya-ss LoRA file (what A1111, ComfyUI, diffusers' `load_lora_weights` and `ldm-jax --lora` read).

Each adapted kernel W [in, out] (a Linear; SD 1.x's proj_in / proj_out are 1x1 convs [1, 1, in, out]) is used as

    W' = W + (alpha / r) * down @ up          down [in, r], up [r, out]; W frozen

down starts kaiming-uniform (torch's nn.Linear init, U(-1/sqrt(in), 1/sqrt(in)), as kohya and PEFT), up at zero,
so step 0 is the base model. Which kernels (`TARGETS`): "attn", the q, k, v and output projections of every self-
and cross-attention (diffusers' `train_text_to_image_lora.py`); "transformer", every Linear of the transformer
blocks plus proj_in / proj_out (kohya's `networks.lora` on Transformer2DModel). With `text_encoder` (`--lora-rank`
with `--train-text-encoder`) every Linear of the CLIP text encoders' layers is adapted as well (self-attention q, k,
v, out and the MLP's fc1, fc2: kohya's CLIPAttention / CLIPMLP targets, `text_modules`; SDXL: both encoders); their
factors follow the U-Net's in the state and in `init`'s key order.

With a conv rank (`--lora-conv-rank`, kohya's `conv_dim`: "LoRA-C3Lier", LyCORIS' LoCon) the ResBlocks and the
down/upsamplers are adapted too (`CONV`): their 3x3 convs W [3, 3, in, out] as W + (conv_alpha / r_c) down . up with
down [3, 3, in, r_c] (a 3x3 conv to r_c channels, fan-in 9 in) and up [r_c, out] (a 1x1 conv), their time-embedding
Linear and 1x1 skip conv at the plain rank, as kohya's networks.lora does.

The file: `<module>.lora_down.weight` = down^T [r, in(, 1, 1)] (a 3x3 down: [r_c, in, 3, 3]),
`<module>.lora_up.weight` = up^T [out, r(, 1, 1)], `<module>.alpha`, module names as kohya's trainer writes them for
this model (`convert.lora_names`: diffusers U-Net paths for SD 1.x / 2.x, sgm paths for SDXL), so `convert.lora`
merges it back into the same W'.
"""

from __future__ import annotations

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

FILE = "lora.safetensors"  # a LoRA run's result, in RUN_DIR
TARGETS = {
    "attn": re.compile(r"_attn[12]_to_(q|k|v|out_0)$"),
    "transformer": re.compile(r"(_attn[12]_to_(q|k|v|out_0)|_ff_net_0_proj|_ff_net_2|_proj_in|_proj_out)$"),
}
_SGM_UNET = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_")
CONV = re.compile(r"(_resnets_\d+_(conv1|conv2|time_emb_proj|conv_shortcut)|_(down|up)samplers_0_conv"  # diffusers
                  r"|_\d+_(in_layers_2|out_layers_3|emb_layers_1|skip_connection)|_input_blocks_\d+_0_op"  # sgm
                  r"|_output_blocks_\d+_\d+_conv)$")
_TEXT = re.compile(r"^lora_te[12]?_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])$")
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


def check_targets(targets: str) -> str:
    if targets not in TARGETS:
        raise ValueError(f"LoRA targets must be one of {', '.join(TARGETS)}, got {targets!r}")
    return targets


@functools.lru_cache(maxsize=8)
def modules(config, targets: str, conv: bool = False) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """{kohya module name: (path of the adapted kernel in the U-Net's Flax tree, its shape)}, in name order; with
    `conv`, the `CONV` modules too."""
    from convert.lora_names import module_table

    out = {}
    for name, entry in module_table(config).items():
        matches = TARGETS[check_targets(targets)].search(name) or (conv and CONV.search(name))
        if not name.startswith("lora_unet_") or not matches:
            continue
        if config.is_sdxl and not _SGM_UNET.match(name):  # kohya names SDXL's U-Net the sgm way
            continue
        shape = tuple(entry.flax_shape)
        if len(shape) == 2 or (len(shape) == 4 and (shape[:2] == (1, 1) or conv)):
            out[name] = (tuple(entry.flax_path), shape)
    return dict(sorted(out.items()))


def is_spatial(shape) -> bool:
    """Whether a kernel is a k x k conv (k > 1): adapted at the conv rank, its down factor a k x k conv."""
    return len(shape) == 4 and tuple(shape[:2]) != (1, 1)


@functools.lru_cache(maxsize=16)
def text_modules(config, component: str = "text_encoder") -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """{kohya module name: (path of the adapted kernel in the text encoder's Flax tree, its shape)} of one text
    encoder (`lora_te_*` for SD 1.x / 2.x; SDXL's `lora_te1_*` "text_encoder", `lora_te2_*` "text_encoder_2")."""
    from convert.lora_names import module_table

    out = {name: (tuple(e.flax_path), tuple(e.flax_shape)) for name, e in module_table(config).items()
           if e.component == component and _TEXT.match(name) and len(e.flax_shape) == 2}
    return dict(sorted(out.items()))


def text_components(config) -> tuple[str, ...]:
    """The model's text encoders: ("text_encoder",), SDXL's two."""
    from ldm_jax.models.build import components_of

    return tuple(c for c in components_of(config) if c in TEXT_COMPONENTS)


def _all_text_modules(config) -> dict:
    return {name: m for c in text_components(config) for name, m in text_modules(config, c).items()}


def _all_modules(config, targets: str, text_encoder: bool, conv: bool = False) -> dict:
    return {**modules(config, targets, conv), **(_all_text_modules(config) if text_encoder else {})}


def _down_shape(shape, rank: int, conv_rank: int) -> tuple[int, ...]:
    """down's shape for a kernel: [k, k, in, r_c] for a k x k conv, else [in, r]."""
    return tuple(shape[:3]) + (conv_rank,) if is_spatial(shape) else (shape[-2], rank)


def init(config, targets: str, rank: int, seed: int, text_encoder: bool = False, conv_rank: int = 0) -> dict:
    """{module: {"down": f32 [in, r] (a k x k conv's: [k, k, in, r_c]) kaiming-uniform, "up": f32 [r, out] zeros}}
    (keys from fold_in(seed, i)), the U-Net's modules (with `conv_rank` the `CONV` ones too), then with
    `text_encoder` the text encoder's."""
    key = jax.random.key(seed)
    out = {}
    for i, (name, m) in enumerate(abstract(config, targets, rank, text_encoder, conv_rank).items()):
        bound = 1.0 / np.sqrt(np.prod(m["down"].shape[:-1]))  # fan-in: in (x k x k)
        down = jax.random.uniform(jax.random.fold_in(key, i), m["down"].shape, jnp.float32, -bound, bound)
        out[name] = {"down": down, "up": jnp.zeros(m["up"].shape, jnp.float32)}
    return out


def abstract(config, targets: str, rank: int, text_encoder: bool = False, conv_rank: int = 0) -> dict:
    """The shapes of `init`'s tree (jax.ShapeDtypeStruct leaves)."""
    out = {}
    for name, (_, shape) in _all_modules(config, targets, text_encoder, conv_rank > 0).items():
        down_shape = _down_shape(shape, rank, conv_rank)
        out[name] = {"down": jax.ShapeDtypeStruct(down_shape, jnp.float32),
                     "up": jax.ShapeDtypeStruct((down_shape[-1], shape[-1]), jnp.float32)}
    return out


def merge(unet_params, lora: dict, config, targets: str, scale: float, conv_scale: float | None = None):
    """The U-Net tree with W' = W + scale * down @ up at every adapted kernel (scale = alpha / r; a k x k conv's
    W + conv_scale * down . up, conv_scale = conv_alpha / r_c, when `conv_scale` is given: the LoRA has conv
    modules); traceable and differentiable in `lora` (the rest of the tree is taken as given)."""
    return _merge(unet_params, lora, modules(config, targets, conv_scale is not None), scale, conv_scale)


def merge_text(text_params, lora: dict, config, scale: float, component: str = "text_encoder"):
    """`merge` for a text encoder's tree (`text_modules`)."""
    return _merge(text_params, lora, text_modules(config, component), scale)


def _merge(params, lora: dict, table: dict, scale: float, conv_scale: float | None = None):
    flat = traverse_util.flatten_dict(params)
    for name, (path, shape) in table.items():
        w = flat[path]
        s = conv_scale if is_spatial(shape) else scale
        delta = s * jnp.tensordot(lora[name]["down"], lora[name]["up"], axes=1)  # [(k, k,) in, out]
        flat[path] = w + delta.reshape(shape).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def kohya_tensors(lora: dict, config, targets: str, alpha: float, conv_alpha: float | None = None
                  ) -> dict[str, np.ndarray]:
    """The kohya-ss file's tensors (float32) of a trained `lora` tree (U-Net, and text encoder modules if it has
    them; `conv_alpha`: the LoRA has conv modules)."""
    out = {}
    text = any(n in lora for n in _all_text_modules(config))
    for name, (_, shape) in _all_modules(config, targets, text, conv_alpha is not None).items():
        down, up = (np.asarray(lora[name][k], np.float32) for k in ("down", "up"))
        trail = (1, 1) if len(shape) == 4 else ()  # a conv's factors are convs: torch's [out, in, kh, kw]
        if is_spatial(shape):  # [k, k, in, r] -> [r, in, k, k]
            down_t = down.transpose(3, 2, 0, 1)
        else:
            down_t = down.T.reshape(down.shape[::-1] + trail)
        out[f"{name}.lora_down.weight"] = np.ascontiguousarray(down_t)
        out[f"{name}.lora_up.weight"] = np.ascontiguousarray(up.T.reshape(up.shape[::-1] + trail))
        out[f"{name}.alpha"] = np.asarray(conv_alpha if is_spatial(shape) else alpha, np.float32)
    return out


def kohya_metadata(config, rank: int, alpha: float, extra: dict, conv_rank: int = 0,
                   conv_alpha: float | None = None) -> dict[str, str]:
    """The `ss_*` fields kohya's trainer writes that tools read (network module, dim, alpha, base model family, and
    `ss_network_args` with the conv dim and alpha of a LoRA with conv modules)."""
    family = "sdxl_base_v1-0" if config.is_sdxl else "sd_v2" if config.text.key_layout == "open_clip" else "sd_v1"
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}",
            "ss_base_model_version": family, "ss_v2": str(family == "sd_v2")}
    if conv_rank:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank), "conv_alpha": f"{conv_alpha:g}"})
    meta.update({k: str(v) for k, v in extra.items()})
    return meta
