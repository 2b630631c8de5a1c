"""The key table: every Flax parameter <-> one CompVis state-dict tensor, with a fixed layout rule.

The Flax modules keep CompVis/labml/transformers names, so the table is generated from the model's own
parameter tree (shapes from `jax.eval_shape`, no compute) by two fixed rules:

* names: each Flax path segment `name_1_2` is the CompVis `name.1.2` (list indices), except the VAE's
  `mid.block_1 / attn_1 / block_2`, which CompVis spells with underscores; the leaf `kernel` / `scale` /
  `embedding` is CompVis' `weight`;
* layouts: conv kernel HWIO <- OIHW, dense kernel [in, out] <- [out, in]; everything else as stored.

Component prefixes are those of CompVis' LatentDiffusion (`model.diffusion_model.`, `first_stage_model.`,
`cond_stage_model.transformer.text_model.`). EMA copies of U-Net weights live at `model_ema.` + the model
key minus `model.` with the dots removed (CompVis `LitEma`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.text_model.",
}
_INDEXED = re.compile(r"^(.*?)((?:_\d+)+)$")
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# CompVis' VAE mid block names its children `block_1`, `attn_1`, `block_2` (attributes, not list indices).
_VERBATIM_UNDER = {"mid"}


@dataclass(frozen=True)
class Entry:
    """One row of the table: where a tensor lives on each side and how its layout changes."""

    component: str  # "unet" | "vae" | "text_encoder"
    flax_path: tuple[str, ...]  # path inside sd.params[component]
    key: str  # full CompVis key
    flax_shape: tuple[int, ...]
    layout: str  # "conv" (OIHW <-> HWIO), "dense" ([out,in] <-> [in,out]) or "same"

    @property
    def compvis_shape(self) -> tuple[int, ...]:
        s = self.flax_shape
        if self.layout == "conv":
            return (s[3], s[2], s[0], s[1])
        if self.layout == "dense":
            return (s[1], s[0])
        return s

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


def key_table(component: str, abstract_params, prefix: str | None = None) -> list[Entry]:
    """All entries of one component, from its (abstract) Flax parameter tree (leaves need `.shape`).
    `prefix` overrides the component's CompVis prefix (e.g. "" for a single block's own state dict)."""
    prefix = PREFIXES[component] if prefix is None else prefix
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
