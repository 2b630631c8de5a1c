"""The key table: every Flax parameter <-> one CompVis state-dict tensor, with a fixed layout rule.

The Flax modules keep CompVis/labml/transformers names, so the table is generated from the model's own
parameter tree (shapes from `jax.eval_shape`, no compute) by two fixed rules:

* names: each Flax path segment `name_1_2` is the CompVis `name.1.2` (list indices), except the VAE's
  `mid.block_1 / attn_1 / block_2`, which CompVis spells with underscores; the leaf `kernel` / `scale` /
  `embedding` is CompVis' `weight`;
* layouts: conv kernel HWIO <- OIHW, dense kernel [in, out] <- [out, in]; everything else as stored.

Component prefixes are those of CompVis' LatentDiffusion (`model.diffusion_model.`, `first_stage_model.`,
`cond_stage_model.transformer.text_model.`). EMA copies of U-Net weights live at `model_ema.` + the model
key minus `model.` with the dots removed (CompVis `LitEma`). SD 2.x keeps its text tower under OpenCLIP names
(`text_layout="open_clip"`: `convert.open_clip_keys`), where one tensor can hold several Flax parameters stacked
along its first axis (`Entry.part` of `Entry.parts`: q, k, v in one `in_proj_weight`).

SDXL files are in the sgm layout (`text_layout="sgm"`, Stability-AI/generative-models `DiffusionEngine`): U-Net and
VAE as CompVis, the text encoders under `GeneralConditioner.embedders` (`SGM_PREFIXES`): CLIP ViT-L/14 under
transformers' names (`FrozenCLIPEmbedder`) and OpenCLIP ViT-bigG/14 under OpenCLIP's (`FrozenOpenCLIPEmbedder2`,
whose `text_projection` SDXL uses); the refiner keeps its one text encoder, OpenCLIP bigG, at embedder 0
(`SGM_OPEN_CLIP`). `layout_of(config)` says which layout a model's files have.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ldm_jax.configs import TEXT_KEY_LAYOUTS

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.text_model.",
}
# sgm's (SDXL): sgm/models/diffusion.py DiffusionEngine (model, first_stage_model, conditioner) and
# configs/inference/sd_xl_base.yaml (embedders 0: FrozenCLIPEmbedder, 1: FrozenOpenCLIPEmbedder2)
SGM_CONDITIONER = "conditioner.embedders."  # sgm's GeneralConditioner: every key of its text towers starts so
SGM_PREFIXES = {
    **PREFIXES,
    "text_encoder": SGM_CONDITIONER + "0.transformer.text_model.",
    "text_encoder_2": SGM_CONDITIONER + "1.model.",
}
SGM = "sgm"  # the layout of SDXL files (both text towers under conditioner.embedders.*)
# the SDXL refiner's (sd_xl_refiner.yaml): its one text tower, OpenCLIP bigG (FrozenOpenCLIPEmbedder2), at embedder 0
SGM_OPEN_CLIP = "sgm_open_clip"
SGM_OPEN_CLIP_PREFIX = SGM_CONDITIONER + "0.model."
LAYOUTS = TEXT_KEY_LAYOUTS + (SGM, SGM_OPEN_CLIP)
_INDEXED = re.compile(r"^(.*?)((?:_\d+)+)$")
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# CompVis' VAE mid block names its children `block_1`, `attn_1`, `block_2` (attributes, not list indices).
_VERBATIM_UNDER = {"mid"}


@dataclass(frozen=True)
class Entry:
    """One row of the table: where a tensor lives on each side and how its layout changes."""

    component: str  # "unet" | "vae" | "text_encoder" | "text_encoder_2"
    flax_path: tuple[str, ...]  # path inside sd.params[component]
    key: str  # full CompVis key
    flax_shape: tuple[int, ...]
    layout: str  # "conv" (OIHW <-> HWIO), "dense" ([out,in] <-> [in,out]) or "same"
    part: int = 0  # this parameter is rows [part * n, (part + 1) * n) of the tensor `key` ...
    parts: int = 1  # ... which stacks `parts` parameters of compvis_shape along axis 0 (n = compvis_shape[0])

    @property
    def compvis_shape(self) -> tuple[int, ...]:
        """This parameter's own shape in the CompVis layout (one part of a stacked tensor)."""
        s = self.flax_shape
        if self.layout == "conv":
            return (s[3], s[2], s[0], s[1])
        if self.layout == "dense":
            return (s[1], s[0])
        return s

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape of the whole tensor `key` in the checkpoint (compvis_shape unless stacked)."""
        s = self.compvis_shape
        return (self.parts * s[0],) + s[1:] if self.parts > 1 else s

    @property
    def ema_key(self) -> str | None:
        """CompVis LitEma name (U-Net only): `model.diffusion_model.a.0.b` -> `model_ema.diffusion_modela0b`."""
        if self.component != "unet":
            return None
        return "model_ema." + self.key[len("model."):].replace(".", "")


def compvis_name(path: tuple[str, ...]) -> str:
    """Flax path ('input_blocks_1_1', 'proj_in', 'kernel') -> 'input_blocks.1.1.proj_in.weight'."""
    parts = []
    for i, seg in enumerate(path[:-1]):
        m = _INDEXED.match(seg)
        if m and not (i > 0 and path[i - 1] in _VERBATIM_UNDER):
            parts.append(m.group(1) + m.group(2).replace("_", "."))
        else:
            parts.append(seg)
    leaf = path[-1]
    if leaf not in _LEAF:
        raise ValueError(f"no CompVis name for parameter leaf {leaf!r} at {'/'.join(path)}")
    return ".".join(parts + [_LEAF[leaf]])


def _layout(leaf: str, ndim: int) -> str:
    if leaf == "kernel":
        return {4: "conv", 2: "dense"}[ndim]
    return "same"


def layout_of(config) -> str:
    """The `text_layout` of a ModelConfig's checkpoints: "sgm" for SDXL (two text encoders), "sgm_open_clip" for the
    SDXL refiner, else the config's `text.key_layout` ("transformers" for SD 1.x, "open_clip" for SD 2.x)."""
    if config.text_2 is not None:
        return SGM
    return SGM_OPEN_CLIP if config.is_sdxl_refiner else config.text.key_layout


def key_table(component: str, abstract_params, prefix: str | None = None,
              text_layout: str = "transformers") -> list[Entry]:
    """All entries of one component, from its (abstract) Flax parameter tree (leaves need `.shape`).
    `prefix` overrides the component's CompVis prefix (e.g. "" for a single block's own state dict).
    text_layout: where the checkpoint keeps its text towers (`layout_of(config)`): "transformers" (SD 1.x),
    "open_clip" (SD 2.x), "sgm" (SDXL: `SGM_PREFIXES`) or "sgm_open_clip" (the SDXL refiner: OpenCLIP names under
    `SGM_OPEN_CLIP_PREFIX`). SDXL's "text_encoder_2" is always sgm's OpenCLIP tower; U-Net and VAE ignore the
    layout."""
    if text_layout not in LAYOUTS:
        raise ValueError(f"unknown text key layout {text_layout!r}; choose from {', '.join(LAYOUTS)}")
    if component == "text_encoder_2" or (component == "text_encoder" and text_layout in ("open_clip", SGM_OPEN_CLIP)):
        from convert.open_clip_keys import open_clip_table

        if prefix is None and component == "text_encoder_2":
            prefix = SGM_PREFIXES[component]
        elif prefix is None and text_layout == SGM_OPEN_CLIP:
            prefix = SGM_OPEN_CLIP_PREFIX
        return open_clip_table(_walk_table(component, abstract_params, ""), prefix)  # None: SD 2.x's
    if prefix is None:
        prefix = (SGM_PREFIXES if text_layout == SGM else PREFIXES)[component]
    return _walk_table(component, abstract_params, prefix)


def _walk_table(component: str, abstract_params, prefix: str) -> list[Entry]:
    """The generic table: every leaf of the tree under its CompVis name (`compvis_name`) after `prefix`."""
    entries = []

    def walk(tree, path):
        for name in sorted(tree):
            node = tree[name]
            if isinstance(node, Mapping):
                walk(node, path + (name,))
            else:
                full = path + (name,)
                entries.append(Entry(component, full, prefix + compvis_name(full), tuple(node.shape),
                                     _layout(name, len(node.shape))))

    walk(abstract_params, ())
    keys = [e.key for e in entries]
    if len(set(keys)) != len(keys):
        raise AssertionError(f"key table for {component} is not one-to-one")
    return entries


def take_part(entry: Entry, value):
    """The rows of the checkpoint tensor `value` (shape `entry.stored_shape`) that hold `entry` (a view)."""
    if entry.parts == 1:
        return value
    n = value.shape[0] // entry.parts
    return value[entry.part * n:(entry.part + 1) * n]


def to_flax_layout(entry: Entry, value):
    """A CompVis-layout numpy array -> the Flax layout of `entry` (shape asserted by the caller)."""
    if entry.layout == "conv":
        if value.ndim == 2:  # Linear stored where CompVis has a 1x1 conv (diffusers-converted VAE attention)
            value = value[:, :, None, None]
        return value.transpose(2, 3, 1, 0)
    if entry.layout == "dense":
        return value.T
    return value


def to_compvis_layout(entry: Entry, value):
    """The inverse of `to_flax_layout` (always to the canonical CompVis shape)."""
    if entry.layout == "conv":
        return value.transpose(3, 2, 0, 1)
    if entry.layout == "dense":
        return value.T
    return value
