"""Baking a fine-tuned VAE and kohya-ss LoRAs into a checkpoint: the `--vae FILE` and `--lora FILE[:SCALE]` of
`ldm-jax convert` and `ldm-jax export` (what SD users do with kohya's merge_lora.py or A1111's checkpoint merger).

The baked weights are those sampling-time loading gives (`ldm_jax.load(path, vae=, loras=)`): the VAE file is mapped
by `convert.vae_file` (`swap_vae`, `vae_params`), each LoRA file `convert.lora` takes is merged in order by
`convert.lora.apply_loras` (kohya: W += scale * alpha / rank * up @ down, computed in fp32; LyCORIS modules by
their own formulas). Before a narrower output dtype (fp32 weights written as fp16) the LoRAs are merged into the
wider weights and the sum is rounded once, as merge_lora.py's --save_precision does (`work_dtype`). The
files are checked (missing, another kind of file, not fitting the model) before any slow work (`check_files`).

What was baked in is recorded (`record`): {"vae": file name, "vae_sha256": hex, "loras": [{"name", "scale",
"sha256"}]}, as metadata.json entries of a converted directory and as the `ldm_jax.vae`, `ldm_jax.vae_sha256` and
`ldm_jax.loras` (JSON) entries of an exported file's safetensors `__metadata__` (`header`); `ldm_jax.load` puts them
into `sd.metadata`. A source's own record is kept: a new VAE replaces the recorded one, new LoRAs follow the
earlier ones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import ml_dtypes
import numpy as np

VAE_HELP = ("bake in a standalone CompVis-layout autoencoder (.safetensors/.ckpt, e.g. "
            "vae-ft-mse-840000-ema-pruned.safetensors) instead of SRC's own; its name and sha256 are recorded")
LORA_HELP = ("merge a kohya-ss LoRA/LoCon file (lora_unet_*/lora_te_*; SDXL: lora_te1_*/lora_te2_*) into the weights "
             "with SCALE (default 1.0); repeatable, merged in order; names, scales and sha256 are recorded")
_FLOATS = {np.dtype(t) for t in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16)}


def add_arguments(p) -> None:
    """--vae and --lora on the parser `p` (args.vae: a path or None; args.lora: [(path, scale), ...])."""
    from convert.lora import lora_arg  # numpy: imported when the parser is built, not by `import ldm_jax.cli`

    p.add_argument("--vae", metavar="VAE_FILE", help=VAE_HELP)
    p.add_argument("--lora", metavar="FILE[:SCALE]", action="append", type=lora_arg, default=[], help=LORA_HELP)


def check_files(vae, loras, config=None) -> None:
    """A VAE or LoRA file that is missing, of another kind or layout, or (`config` given) does not fit the model (a
    LoRA: of another family, SD 1.x / 2.x / SDXL) is a one-line CheckpointError; reads the files' indexes (and the
    LoRAs' alphas) only."""
    from convert.lora import check_lora_file
    from convert.vae_file import check_vae_file

    if vae is not None:
        check_vae_file(vae, config)
    for path, _ in loras:
        check_lora_file(path, config)


def wider(a, b) -> np.dtype:
    """The float dtype that holds both `a` and `b` exactly (fp16 and bf16: fp32)."""
    a, b = np.dtype(a), np.dtype(b)
    if a == b or a.itemsize > b.itemsize:
        return a
    if b.itemsize > a.itemsize:
        return b
    return np.dtype(np.float32)


def stored_dtype(state_dict: Mapping[str, object]) -> np.dtype:
    """The dtype of a CompVis state dict's model tensors (U-Net, EMA U-Net, VAE, text encoder; the widest where they
    mix); fp32 if none is a float."""
    from convert.keys import PREFIXES, SGM_PREFIXES

    prefixes = tuple(PREFIXES.values()) + tuple(SGM_PREFIXES.values()) + ("model_ema.",)
    found = {np.dtype(v.dtype) for k, v in state_dict.items()
             if k.startswith(prefixes) and not k.startswith("first_stage_model.loss.")
             and k not in ("model_ema.decay", "model_ema.num_updates") and hasattr(v, "dtype")}
    found &= _FLOATS
    out = found.pop() if found else np.dtype(np.float32)
    for dtype in found:
        out = wider(out, dtype)
    return out


def work_dtype(target, stored, loras) -> np.dtype:
    """The dtype to convert and merge in before the weights are written as `target`: `target`, or with LoRAs the
    wider of `stored` and `target` (a merged weight is rounded once, to `target`)."""
    return wider(stored, target) if loras else np.dtype(target)


def bake(sd, vae=None, loras=(), *, allow_unexpected: bool = False, allow_nonfinite: bool = False):
    """The StableDiffusion `sd` with the VAE file `vae` swapped in and the (path, scale) LoRAs merged, in the dtype
    of its weights; returns (sd, the VAE's MappingReport summary or None)."""
    report = None
    if vae is not None:
        from convert.vae_file import swap_vae

        sd = swap_vae(sd, vae, allow_unexpected=allow_unexpected, allow_nonfinite=allow_nonfinite)
        report = sd.metadata["vae_report"]
    if loras:
        from convert.lora import apply_loras

        sd = apply_loras(sd, loras)
    return sd, report


def cast_params(params, dtype, place=None):
    """{component: tree} with every leaf cast to `dtype` (through `place`, e.g. `jax.device_put`); a finite weight
    that does not fit (fp16: |w| > 65504) is a CheckpointError naming its CompVis tensor, never a silent Inf."""
    from convert.keys import SGM, key_table
    from convert.mapping import cast_checked, leaf_at

    dtype = np.dtype(dtype)
    layout = SGM if "text_encoder_2" in params else "transformers"  # SDXL: its text encoders' names in the errors
    out: dict = {}
    for component, tree in params.items():
        for entry in key_table(component, tree, text_layout=layout):
            cast = cast_checked(entry.key, np.asarray(leaf_at(tree, entry.flax_path)), dtype)
            node = out.setdefault(component, {})
            for name in entry.flax_path[:-1]:
                node = node.setdefault(name, {})
            node[entry.flax_path[-1]] = place(cast) if place else cast
    return out


def earlier_record(src: str) -> dict:
    """What the source `src` says was baked into it: a converted directory's metadata.json, an ldm-jax export's
    header; {} for other files."""
    from ldm_jax.loading import baked_in

    if os.path.isdir(src):
        from convert.orbax_io import read_info

        metadata = read_info(src)[1]
        out = {k: metadata[k] for k in ("vae", "vae_sha256", "loras") if k in metadata}
        if not isinstance(out.get("loras", []), list):
            del out["loras"]
        return out
    if src.endswith(".safetensors"):
        from convert.safetensors_io import read_safetensors

        return baked_in(read_safetensors(src)[1])
    return {}


def record(vae, loras, earlier: Mapping | None = None, progress: bool = False) -> dict:
    """{"vae", "vae_sha256", "loras"} of what the result carries: `earlier` (the source's record) with the VAE file
    `vae` replacing its VAE and the (path, scale) `loras` after its LoRAs; the files are hashed (sha256) here."""
    from convert.readers import sha256_file

    out = dict(earlier or {})
    if vae is not None:
        out.update(vae=os.path.basename(vae), vae_sha256=sha256_file(vae, progress))
    merged = list(out.get("loras", [])) + [{"name": os.path.basename(p), "scale": float(s), "sha256": sha256_file(p)}
                                           for p, s in loras]
    if merged:
        out["loras"] = merged
    return out


def header(rec: Mapping) -> dict[str, str]:
    """The safetensors `__metadata__` entries of a `record` (`ldm_jax.loading.BAKED_HEADER_KEYS`)."""
    from ldm_jax.loading import BAKED_HEADER_KEYS

    return {BAKED_HEADER_KEYS[k]: (json.dumps(v) if k == "loras" else str(v)) for k, v in rec.items()}


def describe(vae, loras, rec: Mapping, vae_report: str | None) -> list[str]:
    """Lines for the command's output: the VAE (with its mapping report) and each LoRA merged by this command."""
    lines = []
    if vae is not None:
        lines.append(f"VAE from {vae} (sha256 {rec['vae_sha256']}):\n{vae_report}")
    new = rec.get("loras", [])[len(rec.get("loras", [])) - len(loras):] if loras else []
    for (path, scale), entry in zip(loras, new):
        lines.append(f"LoRA {path} merged with scale {scale:g} (sha256 {entry['sha256']})")
    return lines
