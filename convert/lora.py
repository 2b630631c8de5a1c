"""kohya-ss LoRA files (the common SD 1.x / 2.x / SDXL LoRA format, as on civitai), LyCORIS ones included: merge
them into a model's weights.

A kohya file holds, for each adapted module, `<name>.lora_down.weight` [rank, in(, kh, kw)],
`<name>.lora_up.weight` [out, rank(, 1, 1)] and optionally `<name>.alpha` (a scalar; absent: alpha = rank). The
merge is kohya's own: W' = W + scale * (alpha / rank) * (up @ down), for a conv weight with up and down flattened
to matrices and the product reshaped to W's [out, in, kh, kw] (1x1 convs and LoCon's 3x3 convs, whose up is 1x1).
LyCORIS files use the same names with other tensors per module: LoHa (`hada_*`), LoKr (`lokr_*`), LoCon with a
Tucker core (`lora_mid.weight`) and full updates (`diff`, `diff_b`); W' = W + scale * dW, dW from `convert.lycoris`.
Each module is merged by the kind of its tensors; one file may hold modules of several kinds.

Names: a component prefix and the module's path in the model kohya trains, dots as underscores.
* SD 1.x / 2.x (kohya's train_network.py trains diffusers' models): `lora_unet_` + the diffusers
  UNet2DConditionModel module path, `lora_te_` + the transformers CLIPTextModel one.
* SDXL (sdxl_train_network.py trains kohya's own sgm-named U-Net, library/sdxl_original_unet.py, and the two text
  encoders as transformers CLIPTextModel / CLIPTextModelWithProjection; networks/lora.py prefixes `lora_unet`,
  `lora_te1`, `lora_te2`): `lora_unet_` + the CompVis/sgm module path (`convert.lora_names`:
  `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `lora_unet_middle_block_0_in_layers_2`),
  `lora_te1_` (CLIP ViT-L) and `lora_te2_` (OpenCLIP bigG, whose Flax tree has transformers' names; its q, k, v
  are row blocks of the checkpoint's in_proj_weight) + `text_model_encoder_layers_N_` + `self_attn_{q,k,v,out}_proj`,
  `mlp_fc1` or `mlp_fc2`. SDXL U-Net modules named the diffusers way (`lora_unet_down_blocks_1_attentions_0_...`, as
  diffusers' converter makes of them) are taken too; a file mixing the two namings is refused.
The diffusers U-Net names are generated from the model's config and sent to CompVis names
(`convert.lora_names.diffusers_unet_modules`); tests/test_lora.py and tests/test_lora_sdxl.py prove every module
against diffusers' own single-file conversion (SDXL's sgm names also through diffusers' kohya converter,
`_maybe_map_sgm_blocks_to_diffusers` + `_convert_non_diffusers_lora_to_diffusers`). A LoRA of another family
(SD 1.x, SD 2.x or SDXL: one or two text encoders, the width of the text features its modules take) is one line
naming both (`_check_family`). Anything else is refused in one line naming the key, before the model is loaded
(`check_lora_file` reads shapes and alphas only): DoRA (`dora_scale`) and the other LyCORIS algorithms ((IA)^3, OFT,
GLoRA, ...), diffusers/PEFT-format LoRAs, unknown tensors, modules that mix kinds or lack a tensor, modules this
model lacks and shapes that do not fit it. No torch; files are read by `convert.readers` (memory-mapped, no code
runs).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping

import numpy as np

from convert import lycoris
from convert.errors import CheckpointError
from convert.keys import to_flax_layout
from convert.lora_names import module_tables
from convert.mapping import leaf_at
from convert.readers import labelled, read_labelled

COMPONENT_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                      "lora_te2_": "text_encoder_2"}
ONE_ENCODER, TWO_ENCODERS = ("lora_te_",), ("lora_te1_", "lora_te2_")  # SD 1.x / 2.x, SDXL (kohya networks/lora.py)
_KEY = re.compile(r"^(lora_(?:unet|te[12]?)_[A-Za-z0-9_]+)\.(.+)$")
# U-Net block names: sgm's (kohya's SDXL U-Net) and diffusers' (`_maybe_map_sgm_blocks_to_diffusers`' two lists)
_SGM_BLOCKS = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_")
_DIFFUSERS_BLOCKS = re.compile(r"^lora_unet_(down_blocks|mid_block|up_blocks)_")


def _where(path: str, message: str) -> str:
    return labelled("LoRA file", path, message)


def parse_lora_arg(text: str) -> tuple[str, float]:
    """--lora FILE[:SCALE] -> (FILE, SCALE); the scale defaults to 1.0. A ValueError (for argparse) on a bad one."""
    path, sep, tail = text.rpartition(":")
    if not sep or not re.fullmatch(r"\s*[-+0-9.eE]+\s*", tail):
        if sep and path and os.path.isfile(path) and not os.path.exists(text):  # FILE:typo, not a path with ':'
            raise ValueError(f"{text!r}: the scale after ':' must be a number (FILE[:SCALE])")
        return text, 1.0
    try:
        scale = float(tail)
    except ValueError:
        raise ValueError(f"{text!r}: the scale after ':' must be a number (FILE[:SCALE])") from None
    if not math.isfinite(scale) or not path:
        raise ValueError(f"{text!r}: expected FILE[:SCALE] with a finite scale")
    return path, scale


def lora_arg(text: str) -> tuple[str, float]:
    """argparse `type=` of --lora: parse_lora_arg, its error as argparse's one line."""
    import argparse

    try:
        return parse_lora_arg(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def read_lora(path: str | os.PathLike, config=None) -> dict[str, dict[str, np.ndarray]]:
    """{kohya module name: {tensor suffix ("lora_down.weight", "hada_w1_a", "alpha", ...): array}} of a kohya LoRA
    or LyCORIS file, each module of one known kind (`lycoris.module_kind`); anything else is one line naming it.
    With the model's `config`, a LoRA for the other number of text encoders (SDXL's lora_te1_/lora_te2_ on SD 1.x
    or 2.x, or the reverse) is one line naming both families, before its modules are checked."""
    path = os.fspath(path)
    state_dict = read_labelled(path, "LoRA file", "a kohya-ss LoRA .safetensors file")
    if not any(k.startswith(("lora_unet_", "lora_te")) for k in state_dict):
        from convert.file_kinds import describe

        kind = describe(state_dict)
        what = kind.split(";")[0] if kind else f"e.g. {next(iter(state_dict), 'no tensors at all')}"
        raise CheckpointError(_where(path, f"is not a kohya-ss LoRA (lora_unet_*/lora_te_* keys): {what}"))
    modules: dict[str, dict[str, np.ndarray]] = {}
    first: dict[str, str] = {}  # module name: its first key (for messages)
    for key, value in state_dict.items():
        m = _KEY.match(key)
        suffix = m.group(2) if m else None
        if suffix in lycoris.REFUSED:
            raise CheckpointError(_where(path, f"{key}: {lycoris.REFUSED[suffix]}"))
        if suffix != "alpha" and suffix not in lycoris.KIND_OF_SUFFIX:
            raise CheckpointError(_where(path, f"{key}: not a kohya-ss LoRA or LyCORIS tensor (expected "
                                               f"lora_unet_*/lora_te_* MODULE.{lycoris.EXPECTED})"))
        modules.setdefault(m.group(1), {})[suffix] = value
        first.setdefault(m.group(1), key)
    if config is not None:
        _check_encoders(path, modules, first, config)
    _check_unet_naming(path, modules)
    for name, parts in modules.items():
        try:
            lycoris.module_kind(parts)
        except ValueError as e:
            raise CheckpointError(_where(path, f"{name}: {e}")) from None
    return modules


def _check_encoders(path, modules, first, config) -> None:
    """kohya names the text encoder of SD 1.x / 2.x `lora_te_`, SDXL's two `lora_te1_` and `lora_te2_` (sd-scripts
    networks/lora.py; diffusers' `_convert_non_diffusers_lora_to_diffusers` reads the same three prefixes): a LoRA
    with the other model's prefixes is one line naming its first such key and both families."""
    name = next((n for n in modules if n.startswith(ONE_ENCODER if config.is_sdxl else TWO_ENCODERS)), None)
    if name is None:
        return
    if config.is_sdxl:
        widths = [_input_width(p) for n, p in modules.items()
                  if n.startswith("lora_te_") and n.endswith("_self_attn_q_proj")]
        lora = next((FAMILY_OF_TEXT_WIDTH[w] for w in widths if w in FAMILY_OF_TEXT_WIDTH), "SD 1.x/2.x")
        raise CheckpointError(_where(path, f"{first[name]}: an {lora} LoRA (one text encoder, lora_te_*) and this "
                                           "model is SDXL (two text encoders, lora_te1_*/lora_te2_*); use a LoRA "
                                           "trained for SDXL"))
    model = FAMILY_OF_TEXT_WIDTH.get(config.text.hidden_size)
    this = f"this model is {model} (one text encoder); use a LoRA trained for {model}" if model else (
        "this model has one text encoder; use a LoRA trained for it")
    raise CheckpointError(_where(path, f"{first[name]}: an SDXL LoRA (two text encoders, lora_te1_*/lora_te2_*) and "
                                       f"{this}"))


def _check_unet_naming(path, modules) -> None:
    """U-Net modules named both sgm's way (input_blocks/middle_block/output_blocks: kohya's SDXL LoRAs) and
    diffusers' (down_blocks/mid_block/up_blocks) in one file: one line (diffusers' `_maybe_map_sgm_blocks_to_
    diffusers` silently drops the sgm ones; here neither is guessed)."""
    sgm = next((n for n in modules if _SGM_BLOCKS.match(n)), None)
    diffusers = next((n for n in modules if _DIFFUSERS_BLOCKS.match(n)), None)
    if sgm and diffusers:
        raise CheckpointError(_where(path, f"{sgm} and {diffusers}: U-Net modules named both sgm's way "
                                           "(input_blocks/middle_block/output_blocks, kohya's SDXL LoRAs) and "
                                           "diffusers' (down_blocks/mid_block/up_blocks) in one file; expected one"))


def _label(entry) -> str:
    """The model tensor an Entry names in messages: its key, and for one part of a stacked tensor (SDXL's second
    text encoder: q, k, v are row blocks of in_proj_weight) its rows."""
    if entry.parts == 1:
        return entry.key
    n = entry.compvis_shape[0]
    return f"{entry.key}[{entry.part * n}:{(entry.part + 1) * n}]"


def _alpha(path, name, parts, rank) -> float | None:
    """The module's alpha (absent: `rank`), checked to be one finite number."""
    if "alpha" not in parts:
        return rank
    alpha = np.asarray(parts["alpha"], np.float64)
    if alpha.size != 1 or not math.isfinite(float(alpha.reshape(-1)[0])):
        raise CheckpointError(_where(path, f"{name}.alpha: expected one finite number"))
    return float(alpha.reshape(-1)[0])


def _fit(path, name, parts, entry, bias) -> tuple[str, float]:
    """(kind, alpha factor) of one module, its shapes checked against the model's weight `entry` and, for a full
    module's diff_b, its `bias` Entry (None: the model's module has no bias). Shapes and the alpha only are read."""
    kind = lycoris.module_kind(parts)
    target = entry.compvis_shape  # [out, in] or [out, in, kh, kw]
    if kind != "LoRA":
        try:
            rank = lycoris.rank_of(kind, parts, target)
        except ValueError as e:
            shapes = ", ".join(f"{s} {tuple(v.shape)}" for s, v in sorted(parts.items()) if s != "alpha")
            raise CheckpointError(_where(path, f"{name}: {kind} tensors {shapes} do not fit the model's "
                                               f"{_label(entry)} {target}: {e}")) from None
        if "diff_b" in parts and (bias is None or tuple(parts["diff_b"].shape) != bias.compvis_shape):
            where = (f"the model's {_label(bias)} {bias.compvis_shape}" if bias is not None else
                     f"the model's {entry.key.rsplit('.', 1)[0]} has no bias")
            raise CheckpointError(_where(path, f"{name}.diff_b {tuple(parts['diff_b'].shape)} does not fit: {where}"))
        return kind, lycoris.alpha_factor(_alpha(path, name, parts, rank), rank)
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    rank = down.shape[0] if down.ndim else 0
    trail = target[2:] if len(target) == 4 else ()
    ok_trail = {trail, ()} if trail in ((), (1, 1)) else {trail}  # a 1x1 conv may come as a Linear, as in kohya
    fits = (down.ndim in (2, 4) and rank > 0 and down.shape[1] == target[1] and tuple(down.shape[2:]) in ok_trail
            and up.ndim in (2, 4) and up.shape[:2] == (target[0], rank) and all(s == 1 for s in up.shape[2:]))
    if not fits:
        raise CheckpointError(_where(path, f"{name}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} do "
                                           f"not fit the model's {_label(entry)} {target}"))
    return kind, _alpha(path, name, parts, rank) / rank


FAMILY_OF_TEXT_WIDTH = {768: "SD 1.x", 1024: "SD 2.x"}  # CLIP ViT-L/14, OpenCLIP ViT-H/14 (one text encoder)
# the U-Net's cross-attention context: SDXL's is CLIP ViT-L/14 (768) and OpenCLIP bigG (1280) side by side
FAMILY_OF_CONTEXT_WIDTH = {**FAMILY_OF_TEXT_WIDTH, 2048: "SDXL"}


def _input_width(parts) -> int | None:
    """The input width of a Linear module's update (LoRA, LoHa, full); None where its tensors do not show it."""
    for key, tucker in (("lora_down.weight", "lora_mid.weight"), ("hada_w1_b", "hada_t1"), ("diff", None)):
        if key in parts and tucker not in parts and getattr(parts[key], "ndim", 0) >= 2:
            return int(parts[key].shape[1])
    return None


def _width_rule(name, config) -> tuple[int, str, Mapping[int, str]] | None:
    """(the width of the text features the model's module `name` takes, what they are, {width: the family of a LoRA
    whose module takes that width}) for the modules that tell a LoRA's family (text-encoder q_proj, U-Net attn2
    to_k/to_v), else None. SDXL's lora_te1_/lora_te2_ are SDXL's by their prefix (`_check_encoders`)."""
    if name.endswith("_self_attn_q_proj"):
        if name.startswith("lora_te_"):
            return config.text.hidden_size, "text encoder", FAMILY_OF_TEXT_WIDTH
        if name.startswith("lora_te1_"):
            return config.text.hidden_size, "first text encoder", {}
        if name.startswith("lora_te2_"):
            return config.text_2.hidden_size, "second text encoder", {}
    if name.startswith("lora_unet_") and name.endswith(("_attn2_to_k", "_attn2_to_v")):
        return config.unet.d_cond, "cross-attention context", FAMILY_OF_CONTEXT_WIDTH
    return None


def _check_family(path, modules, config) -> None:
    """A LoRA of another family (SD 1.x, SD 2.x, SDXL) or model: one line naming both, from the width of the text
    features the LoRA's text-encoder attention and U-Net cross-attention (attn2 to_k/to_v) modules take."""
    for name, parts in modules.items():
        rule = _width_rule(name, config)
        width = None if rule is None else _input_width(parts)
        if width is None or width == rule[0]:
            continue
        have, what, families = rule
        lora, model = families.get(width), "SDXL" if config.is_sdxl else FAMILY_OF_TEXT_WIDTH.get(have)
        if lora and model and lora != model:
            raise CheckpointError(_where(path, f"an {lora} LoRA ({name} takes {width}-wide text features) and this "
                                               f"model is {model} ({have}-wide {what}); use a LoRA trained for "
                                               f"{model}"))
        raise CheckpointError(_where(path, f"a LoRA for another model: {name} takes {width}-wide text features, this "
                                           f"model's {what} is {have}-wide"))


def check_lora_file(path: str | os.PathLike, config=None, tables=None) -> dict:
    """Fail early (before a model is loaded or compiled) on a LoRA file that is missing, not a kohya-ss LoRA or
    LyCORIS file, or (when the model's `config` is known) of another family, naming a module the model lacks or not
    fitting its shapes. Reads the file's index (shapes) and the alphas only. Returns the parsed modules
    (`read_lora`); `tables`: `module_tables(config)`, when the caller has them."""
    path = os.fspath(path)
    modules = read_lora(path, config)
    if config is None and tables is None:
        return modules
    if config is not None:
        _check_family(path, modules, config)
    weights, biases = module_tables(config) if tables is None else tables
    sdxl = config.is_sdxl if config is not None else any(n.startswith(TWO_ENCODERS) for n in weights)
    expected = ("kohya-ss SDXL names: lora_unet_<sgm U-Net module, e.g. input_blocks_4_1_transformer_blocks_0_attn1_"
                "to_q, or diffusers U-Net module>, lora_te1_text_model_*, lora_te2_text_model_*" if sdxl else
                "kohya-ss SD 1.x/2.x names: lora_unet_<diffusers U-Net module>, lora_te_text_model_*")
    for name, parts in modules.items():
        entry = weights.get(name)
        if entry is None:
            raise CheckpointError(_where(path, f"{name}: no such module in this model (expected {expected})"))
        _fit(path, name, parts, entry, biases.get(name))
    return modules


def lora_deltas(loras, config) -> dict[tuple[str, tuple[str, ...]], np.ndarray]:
    """{(component, Flax path): the summed fp32 update in the Flax layout} of the (path, scale) pairs `loras`."""
    tables = module_tables(config)
    deltas: dict[tuple[str, tuple[str, ...]], np.ndarray] = {}

    def add(entry, delta):
        where = (entry.component, entry.flax_path)
        delta = to_flax_layout(entry, delta)
        deltas[where] = deltas[where] + delta if where in deltas else delta

    for path, scale in loras:
        path = os.fspath(path)
        for name, parts in check_lora_file(path, config, tables=tables).items():
            entry, bias = tables[0][name], tables[1].get(name)
            kind, factor = _fit(path, name, parts, entry, bias)
            if kind == "LoRA":
                rank = parts["lora_down.weight"].shape[0]
                up = np.asarray(parts["lora_up.weight"], np.float32).reshape(entry.compvis_shape[0], rank)  # [out, r]
                down = np.asarray(parts["lora_down.weight"], np.float32).reshape(rank, -1)  # [r, in*kh*kw]
                delta = (up @ down).reshape(entry.compvis_shape)
            else:
                delta = lycoris.delta(kind, parts, entry.compvis_shape)
            add(entry, np.float32(scale * factor) * delta)
            if "diff_b" in parts:
                add(bias, np.float32(scale) * np.asarray(parts["diff_b"], np.float32))
    return deltas


def _replace(tree: Mapping, path: tuple[str, ...], value):
    """A copy of the nested dict `tree` with `path` set to `value` (only the dicts on the path are copied)."""
    return {**tree, path[0]: value if len(path) == 1 else _replace(tree[path[0]], path[1:], value)}


def normalise_loras(loras) -> list[tuple[str, float]]:
    """(path, scale) pairs from (path, scale) pairs or bare paths (scale 1.0)."""
    out = []
    for item in loras:
        path, scale = (item, 1.0) if isinstance(item, (str, os.PathLike)) else item
        out.append((os.fspath(path), float(scale)))
    return out


def apply_loras(sd, loras):
    """A copy of the StableDiffusion `sd` with each LoRA file (path, scale) of `loras` merged into its weights
    (in fp32, stored in the dtype of each weight); `metadata["loras"]`: [{"name": base name, "scale": scale}]
    after those the checkpoint says were baked into it.
    Weights no LoRA adapts are shared, not copied."""
    import jax

    loras = normalise_loras(loras)
    params = sd.params
    for (component, flax_path), delta in lora_deltas(loras, sd.config).items():
        node = leaf_at(params[component], flax_path)
        merged = (np.asarray(node, np.float32) + delta).astype(node.dtype)
        params = _replace(params, (component,) + flax_path, jax.device_put(merged))
    earlier = sd.metadata.get("loras")  # baked into the checkpoint (`ldm-jax export/convert --lora`)
    names = (list(earlier) if isinstance(earlier, list) else []) + [
        {"name": os.path.basename(p), "scale": s} for p, s in loras]
    return sd.replace(params=params, metadata={**sd.metadata, "loras": names})


def describe_merged(metadata: Mapping) -> str | None:
    """PNG text, "name.safetensors:0.8, other.safetensors:1" (None without LoRAs), of every LoRA a loaded model
    carries (`metadata["loras"]`: those baked into its checkpoint, then those merged at loading); entries that are
    not {"name", "scale"} are left out."""
    entries = metadata.get("loras")
    if not isinstance(entries, list):
        return None
    out = []
    for e in entries:
        try:
            out.append(f"{e['name']}:{float(e['scale']):g}")
        except (TypeError, KeyError, ValueError):
            continue
    return ", ".join(out) or None
