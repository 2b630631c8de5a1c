"""`ldm-jax export SRC OUT.safetensors`: a converted directory or a CompVis checkpoint file -> one CompVis-layout
.safetensors file of the model tensors, optionally with a fine-tuned VAE and LoRAs baked in.

    ldm-jax export sd-v1-4/ sd-v1-4.safetensors [--dtype fp32|fp16|bf16]
    ldm-jax export sd-v1-4.ckpt sd-v1-4-fp16.safetensors --dtype fp16 [--ema/--no-ema]
    ldm-jax export v1-5-pruned.safetensors styled.safetensors --lora style.safetensors:0.8 [--lora ...]
                   [--vae vae-ft-mse-840000-ema-pruned.safetensors]

The file holds the model tensors only, under their CompVis names and layouts (`convert.mapping.params_to_state_dict`:
OIHW convolutions, [out, in] linears, `cond_stage_model.transformer.text_model.*`; SD 2.x's OpenCLIP tower under
`cond_stage_model.model.*`; SDXL in sgm's layout, `conditioner.embedders.{0,1}.*`): one U-Net, no optimizer state,
EMA copy, schedule buffers or training loss, so torch tools load it (labml, diffusers' single-file loader,
A1111/ComfyUI-style loaders). The U-Net is the EMA one when SRC has EMA weights, as `convert` chooses (--no-ema: the
raw one; a converted directory holds the U-Net it was converted with, and a contrary --ema/--no-ema is refused).
A checkpoint file is read as `convert` reads it: torch-free and memory-mapped (no code from the file runs), the
architecture inferred (or --preset / --config / the config an earlier export stored; SD 2.x's eps- or
v-prediction guessed from the weights and printed with the reason, or given by --prediction), a warning per
schedule buffer that differs from the recomputed schedule, the file hashed (sha256). --vae and --lora bake a VAE
file and kohya-ss/LyCORIS LoRAs into the weights: the weights `ldm_jax.load(SRC, vae=, loras=)` gives at sampling
time, rounded once to a narrower --dtype (`ldm_jax.cli.bake`).

The safetensors `__metadata__` carries `"format": "pt"` (torch layout, as Hugging Face tools expect), the config
JSON under `ldm_jax.config` (so `ldm_jax.load(file)` needs no inference), where the weights came from (source name
and sha256, kind, EMA) and what was baked in (`ldm_jax.vae`, `ldm_jax.vae_sha256`, `ldm_jax.loras`: names, scales,
sha256; kept from a source that records them). Written atomically (`convert.safetensors_io.write_safetensors`).
Default dtype: the source's (a file whose model tensors mix dtypes: the widest). An fp32 export of fp32 weights
reproduces the source's model tensors bit for bit, and a file exports to the same bytes as the directory `convert`
makes of it. Memory: the parameters (in the output dtype; with LoRAs and a narrower --dtype, in the source's) plus
the output tensors; an SD 1.x fp32 file measured 4.3 GB peak to fp16, 6.6 GB to fp16 with a LoRA, 8.5 GB to fp32
with a LoRA.

Refused with one line, leaving no output file: before the weights are read (or hashed), an output name not ending
in .safetensors, an output inside the source directory or replacing the source file, a damaged directory, a VAE or
LoRA file that is missing, of another kind or not fitting the model, --ema for a file without EMA weights; while
they are converted, (--dtype fp16) a weight too large for fp16, which would otherwise become Inf (after any LoRA
is merged: the merged weight is checked).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from ldm_jax.cli import bake
from ldm_jax.cli.cmd_convert import DTYPES, config_from_args, cpu_only_unless_initialised
from ldm_jax.configs import PRESETS
from ldm_jax.errors import UserError

# one-line help: `ldm-jax --help` (ldm_jax/cli/main.py's table still says "a converted directory" only)
def add_parser(subparsers, name: str, help: str) -> None:
    p = subparsers.add_parser(name, help=help, description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="a directory written by `ldm-jax convert`, or a CompVis checkpoint "
                   "file (.ckpt or .safetensors)")
    p.add_argument("out", metavar="OUT.safetensors", help="file to write (replaced atomically if it exists)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="tensor dtype in the file (default: the dtype SRC stores; fp16 refuses weights beyond "
                        "+-65504)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="write the EMA U-Net weights (model_ema.*) as the model's; default: when SRC has them, as "
                        "CompVis and `convert` do")
    bake.add_arguments(p)
    arch = p.add_mutually_exclusive_group()
    arch.add_argument("--preset", choices=sorted(PRESETS), help="checkpoint file: architecture preset instead of "
                      "inferring it")
    arch.add_argument("--config", metavar="CONFIG.json", help="checkpoint file: architecture (ModelConfig JSON) "
                      "instead of inferring it")
    p.add_argument("--prediction", choices=("eps", "v"), help="what the U-Net predicts, recorded in the file's "
                   "config, instead of what SRC says or (SD 2.x files do not say) what its weights suggest: the "
                   "768x768 SD 2.x models predict v, the 512x512 ones eps")
    p.add_argument("--allow-unexpected", action="store_true", help="ignore tensors the model does not use")
    p.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/Inf weights")
    p.set_defaults(func=run)


def run(args) -> int:
    cpu_only_unless_initialised()
    metadata, lines = export_checkpoint(
        args.src, args.out, dtype=args.dtype, ema=args.ema, config=config_from_args(args.preset, args.config),
        vae=args.vae, loras=args.lora, allow_unexpected=args.allow_unexpected, allow_nonfinite=args.allow_nonfinite,
        warn=lambda msg: print(f"ldm-jax export: warning: {msg}", file=sys.stderr), prediction=args.prediction)
    ema = "EMA" if metadata["ldm_jax.ema"] == "true" else "raw"
    print(f"exported {args.src} -> {args.out}: {metadata['ldm_jax.kind']}, {ema} U-Net, "
          f"{metadata['ldm_jax.tensors']} tensors, {metadata['ldm_jax.dtype']}")
    for line in lines:
        print(line)
    return 0


def export_checkpoint(src, out, dtype: str | None = None, *, ema: bool | None = None, config=None, vae=None,
                      loras=(), allow_unexpected: bool = False, allow_nonfinite: bool = False, warn=None,
                      progress: bool | None = None, prediction: str | None = None) -> tuple[dict[str, str], list[str]]:
    """Write the CompVis-layout .safetensors of `src` (a converted directory or a CompVis checkpoint file) with the
    VAE file `vae` and the (path, scale) `loras` baked in; returns (the `__metadata__` written, lines saying what was
    baked in). config: the architecture of a checkpoint file (None: as `convert` finds it). warn(message): one line
    per schedule buffer of a file that differs from the recomputed schedule. prediction: "eps" / "v" instead of the
    config's (`convert.prediction`; an SD 2.x file whose config is inferred prints which it guessed, and why)."""
    from convert.errors import CheckpointError
    from convert.keys import layout_of
    from convert.lora import normalise_loras
    from convert.mapping import params_to_state_dict
    from convert.safetensors_io import check_output_path, write_safetensors
    from ldm_jax import __version__
    from ldm_jax.loading import CONFIG_METADATA_KEY

    src, out = os.fspath(src), os.fspath(out)
    if not src:
        raise CheckpointError("the source path is empty")
    if not out:
        raise CheckpointError("the output file path is empty")
    if not os.path.lexists(src):
        raise CheckpointError(f"{src}: no such directory or file")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    is_dir = os.path.isdir(src)
    if is_dir:
        source = os.path.realpath(src)
        if os.path.commonpath([source, os.path.realpath(out)]) == source:
            raise CheckpointError(f"{out}: is inside the converted directory {src}; write the file elsewhere")
        if config is not None:
            raise UserError(f"{src}: --preset/--config apply to a checkpoint file; a converted directory carries "
                            "its own architecture")
    elif os.path.realpath(src) == os.path.realpath(out):
        raise CheckpointError(f"{out}: is the source file; write the export to another file")
    if not out.endswith(".safetensors") and not os.path.isdir(out):
        raise CheckpointError(f"{out}: the output must be a .safetensors file (export writes safetensors only)")
    check_output_path(out)  # before reading the weights
    vae = None if vae is None else os.fspath(vae)
    loras = normalise_loras(loras)
    bake.check_files(vae, loras)  # missing, or not a VAE / a kohya LoRA: before SRC is read
    target = None if dtype is None else np.dtype(DTYPES[dtype])
    read = _read_directory if is_dir else _read_file
    sd, origin, target, show = read(src, target=target, ema=ema, config=config, vae=vae, loras=loras,
                                    allow_unexpected=allow_unexpected, allow_nonfinite=allow_nonfinite,
                                    warn=warn or print, progress=progress, prediction=prediction)
    sd, vae_report = bake.bake(sd, vae, loras, allow_unexpected=allow_unexpected, allow_nonfinite=allow_nonfinite)
    rec = bake.record(vae, loras, bake.earlier_record(src), show)
    config = sd.config
    # SD 2.x: OpenCLIP names for the text tower; SDXL: sgm's (conditioner.embedders.*)
    state_dict = params_to_state_dict(sd.params, dtype=target, text_layout=layout_of(config))  # casts checked
    del sd
    metadata = {
        "format": "pt",
        CONFIG_METADATA_KEY: config.to_json(),
        "ldm_jax.version": __version__,
        "ldm_jax.layout": "compvis",
        "ldm_jax.dtype": target.name,
        "ldm_jax.tensors": str(len(state_dict)),
        "ldm_jax.kind": str(origin.get("kind", "")),
        "ldm_jax.ema": "true" if origin.get("ema") else "false",
        "ldm_jax.source": str(origin.get("source", "")),
        "ldm_jax.source_sha256": str(origin.get("source_sha256", "")),
        **bake.header(rec),
    }
    write_safetensors(out, state_dict, metadata)
    return metadata, bake.describe(vae, loras, rec, vae_report)


def _read_directory(src, *, target, ema, vae, loras, prediction, **_):
    """(StableDiffusion read in the dtype to bake in, where it came from, the output dtype, progress bars?)."""
    from convert.orbax_io import read_converted, read_info
    from convert.prediction import kind_predicting, with_prediction

    config, info = read_info(src)
    bake.check_files(vae, loras, config)
    stored = np.dtype(info["dtype"])
    target = stored if target is None else target
    # never narrower than stored: the cast to the output dtype (params_to_state_dict) checks each weight fits
    sd = read_converted(src, ema=ema, param_dtype=bake.wider(stored, target).name)
    info = {**info, "kind": kind_predicting(info.get("kind", ""), prediction)}  # sd2 / sd2-v as it now predicts
    return sd.replace(config=with_prediction(sd.config, prediction)), info, target, False


def _read_file(src, *, target, ema, config, vae, loras, allow_unexpected, allow_nonfinite, warn, progress,
               prediction):
    """`_read_directory` for a CompVis checkpoint file, read as `ldm-jax convert` reads it."""
    import jax
    from tqdm.auto import tqdm

    from convert.detect import detect_kind, infer_config, prediction_note
    from convert.errors import CheckpointError
    from convert.mapping import has_ema, normalise_keys, state_dict_to_params
    from convert.prediction import with_prediction
    from convert.readers import read_state_dict
    from convert.readers import sha256_file
    from ldm_jax.cli.cmd_convert import PROGRESS_MIN_BYTES, schedule_warnings
    from ldm_jax.loading import file_config
    from ldm_jax.models.build import abstract_params
    from ldm_jax.stable_diffusion import StableDiffusion

    state_dict = normalise_keys(read_state_dict(src))
    declared = config or file_config(src)
    config = with_prediction(declared, prediction) if declared else infer_config(state_dict, prediction)
    kind = detect_kind(state_dict, config.schedule.prediction)  # sd2 / sd2-v: what the model predicts
    note = None if declared else prediction_note(state_dict, prediction)  # SD 2.x: eps or v, and why
    if note:
        print(note)
    bake.check_files(vae, loras, config)
    if ema and not has_ema(state_dict):
        raise CheckpointError(f"{src}: --ema: the checkpoint has no model_ema.* weights")
    for message in schedule_warnings(state_dict, config.schedule):
        warn(message)
    show = progress if progress is not None else (sys.stderr.isatty()
                                                  and os.path.getsize(src) >= PROGRESS_MIN_BYTES)
    digest = sha256_file(src, show)
    stored = bake.stored_dtype(state_dict)
    target = stored if target is None else target
    shapes = abstract_params(config)
    with tqdm(total=len(jax.tree_util.tree_leaves(shapes)), desc="converting", unit="tensor", disable=not show,
              leave=False) as bar:  # straight to the output dtype (overflow checked) unless LoRAs need more
        params, report = state_dict_to_params(
            state_dict, shapes, ema=ema, dtype=bake.work_dtype(target, stored, loras),
            allow_unexpected=allow_unexpected, allow_nonfinite=allow_nonfinite, progress=lambda _: bar.update())
    origin = {"kind": kind, "ema": report.used_ema, "source": os.path.basename(src), "source_sha256": digest}
    return StableDiffusion(config, params, metadata={"source": os.path.basename(src)}), origin, target, show
