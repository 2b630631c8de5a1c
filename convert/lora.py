"""kohya-ss LoRA files (the common SD 1.x LoRA format, as on civitai), LyCORIS ones included: merge them into a
model's weights.

A kohya file holds, for each adapted module, `<name>.lora_down.weight` [rank, in(, kh, kw)],
`<name>.lora_up.weight` [out, rank(, 1, 1)] and optionally `<name>.alpha` (a scalar; absent: alpha = rank). The
merge is kohya's own: W' = W + scale * (alpha / rank) * (up @ down), for a conv weight with up and down flattened
to matrices and the product reshaped to W's [out, in, kh, kw] (1x1 convs and LoCon's 3x3 convs, whose up is 1x1).
LyCORIS files use the same names with other tensors per module: LoHa (`hada_*`), LoKr (`lokr_*`), LoCon with a
Tucker core (`lora_mid.weight`) and full updates (`diff`, `diff_b`); W' = W + scale * dW, dW from `convert.lycoris`.
Each module is merged by the kind of its tensors; one file may hold modules of several kinds.

Names: `lora_unet_` + the diffusers UNet2DConditionModel module path, `lora_te_` + the transformers
CLIPTextModel module path, dots as underscores. The diffusers U-Net names are generated here from the model's
config and sent to CompVis names (`diffusers_unet_modules`); tests/test_lora.py proves every module against
diffusers' own single-file conversion. Anything else is refused in one line naming the key, before the model is
loaded (`check_lora_file` reads shapes and alphas only): SDXL (`lora_te1_`/`lora_te2_`), DoRA (`dora_scale`) and
the other LyCORIS algorithms ((IA)^3, OFT, GLoRA, ...), diffusers/PEFT-format LoRAs, unknown tensors, modules
that mix kinds or lack a tensor, modules this model lacks and shapes that do not fit it. No torch; files are read
by `convert.readers` (memory-mapped, no code runs).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping

import numpy as np

from convert import lycoris
from convert.errors import CheckpointError
from convert.keys import PREFIXES, key_table, to_flax_layout
from convert.mapping import leaf_at
from convert.readers import labelled, read_labelled

COMPONENT_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
_KEY = re.compile(r"^(lora_(?:unet|te)_[A-Za-z0-9_]+)\.(.+)$")


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


def diffusers_unet_modules(unet) -> dict[str, str]:
    """{diffusers UNet2DConditionModel module path: CompVis U-Net module path} for every module a kohya LoRA
    (LoCon included) can adapt, from the UNetConfig `unet`. conv_shortcut is listed for every resnet (filtered by
    `module_table` where the model has no skip connection)."""
    n, levels = unet.n_res_blocks, len(unet.channel_multipliers)
    out = {"conv_in": "input_blocks.0.0", "conv_out": "out.2",
           "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"}

    def resnet(d, c):
        out.update({f"{d}.conv1": f"{c}.in_layers.2", f"{d}.conv2": f"{c}.out_layers.3",
                    f"{d}.time_emb_proj": f"{c}.emb_layers.1", f"{d}.conv_shortcut": f"{c}.skip_connection"})

    def attention(d, c):
        for m in ("proj_in", "proj_out"):
            out[f"{d}.{m}"] = f"{c}.{m}"
        for t in range(unet.tf_layers):
            for m in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                      "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"):
                out[f"{d}.transformer_blocks.{t}.{m}"] = f"{c}.transformer_blocks.{t}.{m}"

    for i in range(levels):
        for j in range(n):
            k = i * (n + 1) + j + 1
            resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0")
            if i in unet.attention_levels:
                attention(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1")
        if i < levels - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (n + 1)}.0.op"
    resnet("mid_block.resnets.0", "middle_block.0")
    attention("mid_block.attentions.0", "middle_block.1")
    resnet("mid_block.resnets.1", "middle_block.2")
    for u in range(levels):  # up_blocks.u is level levels-1-u, n+1 resnets each
        attn = levels - 1 - u in unet.attention_levels
        for j in range(n + 1):
            k = u * (n + 1) + j
            resnet(f"up_blocks.{u}.resnets.{j}", f"output_blocks.{k}.0")
            if attn:
                attention(f"up_blocks.{u}.attentions.{j}", f"output_blocks.{k}.1")
        if u < levels - 1:
            out[f"up_blocks.{u}.upsamplers.0.conv"] = f"output_blocks.{u * (n + 1) + n}.{2 if attn else 1}.conv"
    return out


def clip_modules(text) -> dict[str, str]:
    """{transformers CLIPTextModel module path: CompVis path under cond_stage_model.transformer.} (the same)."""
    names = [f"text_model.encoder.layers.{i}.{m}" for i in range(text.num_layers)
             for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                       "mlp.fc1", "mlp.fc2")]
    return {name: name for name in names}


def module_tables(config) -> tuple[dict[str, object], dict[str, object]]:
    """({kohya module name (lora_unet_..., lora_te_...): the key-table Entry of the weight it adapts},
    {kohya module name: the Entry of that module's bias, where it has one})."""
    from ldm_jax.models.build import abstract_params

    shapes = abstract_params(config)
    weights, biases = {}, {}
    for prefix, component, modules, base in (
            ("lora_unet_", "unet", diffusers_unet_modules(config.unet), PREFIXES["unet"]),
            ("lora_te_", "text_encoder", clip_modules(config.text), "cond_stage_model.transformer.")):
        entries = {e.key: e for e in key_table(component, shapes[component])}
        for diffusers, compvis in modules.items():
            name = prefix + diffusers.replace(".", "_")
            for table, leaf in ((weights, "weight"), (biases, "bias")):
                entry = entries.get(f"{base}{compvis}.{leaf}")
                if entry is not None and (leaf == "weight" or name in weights):
                    table[name] = entry
    return weights, biases


def module_table(config) -> dict[str, object]:
    """{kohya module name (lora_unet_..., lora_te_...): the key-table Entry of the weight it adapts}."""
    return module_tables(config)[0]


def read_lora(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """{kohya module name: {tensor suffix ("lora_down.weight", "hada_w1_a", "alpha", ...): array}} of a kohya LoRA
    or LyCORIS file, each module of one known kind (`lycoris.module_kind`); anything else is one line naming it."""
    path = os.fspath(path)
    state_dict = read_labelled(path, "LoRA file", "a kohya-ss LoRA .safetensors file")
    if not any(k.startswith(("lora_unet_", "lora_te")) for k in state_dict):
        from convert.file_kinds import describe

        kind = describe(state_dict)
        what = kind.split(";")[0] if kind else f"e.g. {next(iter(state_dict), 'no tensors at all')}"
        raise CheckpointError(_where(path, f"is not a kohya-ss LoRA (lora_unet_*/lora_te_* keys): {what}"))
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        if key.startswith(("lora_te1_", "lora_te2_")):
            raise CheckpointError(_where(path, f"{key}: an SDXL LoRA (two text encoders); ldm-jax merges SD 1.x and "
                                               "2.x LoRAs"))
        m = _KEY.match(key)
        suffix = m.group(2) if m else None
        if suffix in lycoris.REFUSED:
            raise CheckpointError(_where(path, f"{key}: {lycoris.REFUSED[suffix]}"))
        if suffix != "alpha" and suffix not in lycoris.KIND_OF_SUFFIX:
            raise CheckpointError(_where(path, f"{key}: not a kohya-ss LoRA or LyCORIS tensor (expected "
                                               f"lora_unet_*/lora_te_* MODULE.{lycoris.EXPECTED})"))
        modules.setdefault(m.group(1), {})[suffix] = value
    for name, parts in modules.items():
        try:
            lycoris.module_kind(parts)
        except ValueError as e:
            raise CheckpointError(_where(path, f"{name}: {e}")) from None
    return modules


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
            raise CheckpointError(_where(path, f"{name}: {kind} tensors {shapes} do not fit the model's {entry.key} "
                                               f"{target}: {e}")) from None
        if "diff_b" in parts and (bias is None or tuple(parts["diff_b"].shape) != bias.compvis_shape):
            where = (f"the model's {bias.key} {bias.compvis_shape}" if bias is not None else
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
                                           f"not fit the model's {entry.key} {target}"))
    return kind, _alpha(path, name, parts, rank) / rank


FAMILY_OF_TEXT_WIDTH = {768: "SD 1.x", 1024: "SD 2.x"}  # CLIP ViT-L/14, OpenCLIP ViT-H/14


def _input_width(parts) -> int | None:
    """The input width of a Linear module's update (LoRA, LoHa, full); None where its tensors do not show it."""
    for key, tucker in (("lora_down.weight", "lora_mid.weight"), ("hada_w1_b", "hada_t1"), ("diff", None)):
        if key in parts and tucker not in parts and getattr(parts[key], "ndim", 0) >= 2:
            return int(parts[key].shape[1])
    return None


def _check_family(path, modules, config) -> None:
    """An SD 1.x LoRA on an SD 2.x model, or the reverse: one line naming both families, from the width of the text
    features the LoRA's text-encoder attention and U-Net cross-attention (attn2 to_k/to_v) modules take."""
    for name, parts in modules.items():
        if name.startswith("lora_te_") and name.endswith("_self_attn_q_proj"):
            have, what = config.text.hidden_size, "text encoder"
        elif name.startswith("lora_unet_") and name.endswith(("_attn2_to_k", "_attn2_to_v")):
            have, what = config.unet.d_cond, "cross-attention context"
        else:
            continue
        width = _input_width(parts)
        if width is None or width == have:
            continue
        lora, model = FAMILY_OF_TEXT_WIDTH.get(width), FAMILY_OF_TEXT_WIDTH.get(have)
        if lora and model:
            raise CheckpointError(_where(path, f"an {lora} LoRA ({name} takes {width}-wide text features) and this "
                                               f"model is {model} ({have}-wide {what}); use a LoRA trained for "
                                               f"{model}"))
        raise CheckpointError(_where(path, f"a LoRA for another model: {name} takes {width}-wide text features, this "
                                           f"model's {what} is {have}-wide"))


def check_lora_file(path: str | os.PathLike, config=None, tables=None) -> dict:
    """Fail early (before a model is loaded or compiled) on a LoRA file that is missing, not a kohya-ss LoRA or
    LyCORIS file, or (when the model's `config` is known) names a module the model lacks or does not fit its
    shapes. Reads the file's index (shapes) and the alphas only. Returns the parsed modules (`read_lora`);
    `tables`: `module_tables(config)`, when the caller has them."""
    path = os.fspath(path)
    modules = read_lora(path)
    if config is None and tables is None:
        return modules
    weights, biases = module_tables(config) if tables is None else tables
    if config is not None:
        _check_family(path, modules, config)
    for name, parts in modules.items():
        entry = weights.get(name)
        if entry is None:
            raise CheckpointError(_where(path, f"{name}: no such module in this model (expected kohya-ss SD 1.x/2.x "
                                               "names: lora_unet_<diffusers U-Net module>, lora_te_text_model_*)"))
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
