"""`ldm-jax convert SRC OUT_DIR`: a CompVis .ckpt/.safetensors -> an ldm-jax converted (orbax) directory.

    ldm-jax convert sd-v1-4.ckpt sd-v1-4/ [--ema/--no-ema] [--dtype fp32|bf16|fp16] [--vae VAE_FILE]
                    [--lora FILE[:SCALE] ...] [--preset NAME | --config CONFIG.json] [--prediction eps|v]
                    [--allow-unexpected] [--allow-nonfinite] [--overwrite]

Steps: read the file torch-free (`convert.readers`: memory-mapped, no code from the file runs), recognise the model
kind (SD 1.x, SD 2.x, SDXL 1.0 base in sgm's layout and their 9-channel inpainting U-Nets; other kinds, the SDXL
refiner among them, are refused by name), infer the architecture (or
take --preset / --config / the config an `ldm-jax export` stored; SD 2.x's eps- or v-prediction is guessed from the
weights, `convert.prediction`, and printed with the reason; --prediction overrides), compare the schedule buffers
the file carries with the recomputed schedule (a warning per differing buffer), hash the file (sha256), map every
tensor strictly (`convert.mapping`), with --vae replace the autoencoder by a standalone VAE file's
(`convert.vae_file`), with --lora merge kohya-ss LoRAs into the weights (`convert.lora`, as `ldm_jax.load(loras=)`
does; before a narrower --dtype they are merged into the wider weights and rounded once: `ldm_jax.cli.bake`) and
write the directory atomically (`convert.orbax_io`). metadata.json records what was baked in: "vae", "vae_sha256",
"vae_report" (the VAE file's mapping counts) and "loras" ([{"name", "scale", "sha256"}]); a source exported with a
VAE or LoRAs baked in keeps its record (a new --vae replaces it, new LoRAs follow its LoRAs).

Memory: tensors are converted one at a time from the memory-mapped file, placed on the CPU as jax arrays (which
orbax writes without another copy), and the file's pages of each converted tensor are dropped from this
process's resident set, so the peak is about one copy of the parameters (in the stored dtype; with --lora and a
narrower --dtype, in the file's dtype, plus the narrower copy) plus one tensor.
The command keeps jax on the CPU (no GPU context or preallocated GPU memory) when nothing initialised it before.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

import numpy as np

from ldm_jax.configs import PRESETS, ModelConfig, ScheduleConfig
from ldm_jax.errors import UserError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PROGRESS_MIN_BYTES = 256 << 20  # progress bars (on a terminal) for files at least this large
SCHEDULE_RTOL = 1e-6


def add_parser(subparsers, name: str, help: str) -> None:
    p = subparsers.add_parser(name, help=help, description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="CompVis checkpoint: .ckpt (torch zip) or .safetensors")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to create (must not exist or be empty)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="use the EMA U-Net weights (model_ema.*); default: when the file has them, as CompVis does")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="stored parameter dtype (default fp32)")
    from ldm_jax.cli import bake

    bake.add_arguments(p)
    arch = p.add_mutually_exclusive_group()
    arch.add_argument("--preset", choices=sorted(PRESETS), help="architecture preset instead of inferring it")
    arch.add_argument("--config", metavar="CONFIG.json", help="architecture (ModelConfig JSON) instead of inferring it")
    p.add_argument("--prediction", choices=("eps", "v"), help="what the U-Net predicts, instead of what the config "
                   "says or is inferred (SD 2.x files do not say: the 768x768 models predict v, the 512x512 ones eps)")
    p.add_argument("--allow-unexpected", action="store_true", help="ignore tensors the model does not use")
    p.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/Inf weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty OUT_DIR (atomically)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: on a terminal, for files over 256 MiB)")
    p.set_defaults(func=run)


def config_from_args(preset: str | None, config_path: str | None) -> ModelConfig | None:
    """The architecture named by --preset or read from --config (None: infer it from the checkpoint)."""
    if preset:
        return PRESETS[preset]()
    if not config_path:
        return None
    try:
        with open(config_path, encoding="utf-8") as f:
            return ModelConfig.from_json(f.read())
    except OSError as e:
        raise UserError(f"{config_path}: cannot read: {e.strerror}") from e
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{config_path}: not a ModelConfig JSON file: {type(e).__name__}: {e}") from e


def cpu_only_unless_initialised() -> None:
    """Commands that need no accelerator keep jax on the CPU (no GPU context, no GPU memory preallocated), unless
    this process already initialised its backends (then they are left as they are)."""
    import jax

    try:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            return
    except (ImportError, AttributeError):
        return
    jax.config.update("jax_platforms", "cpu")


def run(args) -> int:
    cpu_only_unless_initialised()
    metadata, report = convert_checkpoint(
        args.src, args.out_dir, ema=args.ema, dtype=args.dtype, config=config_from_args(args.preset, args.config),
        prediction=args.prediction,
        allow_unexpected=args.allow_unexpected, allow_nonfinite=args.allow_nonfinite, overwrite=args.overwrite,
        progress=args.progress, warn=lambda msg: print(f"ldm-jax convert: warning: {msg}", file=sys.stderr),
        vae=args.vae, loras=args.lora)
    print(f"converted {args.src} -> {args.out_dir}: {metadata['kind']}, "
          f"{'EMA' if metadata['ema'] else 'raw'} U-Net, {metadata['dtype']}, sha256 {metadata['source_sha256']}")
    if metadata.get("prediction_note"):  # an inferred SD 2.x config: eps or v, and why
        print(metadata["prediction_note"])
    print(report.summary())
    from ldm_jax.cli import bake

    for line in bake.describe(args.vae, args.lora, metadata, metadata.get("vae_report_text")):
        print(line)
    return 0


# ------------------------------------------------------------------------------------------------- conversion


def convert_checkpoint(src, out_dir, *, ema: bool | None = None, dtype: str = "fp32",
                       config: ModelConfig | None = None, allow_unexpected: bool = False,
                       allow_nonfinite: bool = False, overwrite: bool = False, progress: bool | None = None,
                       warn=None, vae: str | os.PathLike | None = None, loras=(), prediction: str | None = None):
    """Convert `src` into the directory `out_dir`; returns (metadata written, MappingReport of `src`).

    warn(message) receives one line per schedule buffer that differs from the recomputed schedule.
    vae: a standalone VAE file whose weights replace `src`'s autoencoder (`convert.vae_file`); the metadata then
    names it ("vae", "vae_sha256", "vae_report"; the returned dict also has "vae_report_text", not written).
    loras: kohya-ss LoRA files merged into the weights, [(path, scale), ...] or bare paths, in order
    (`convert.lora.apply_loras`); the metadata lists them ("loras": [{"name", "scale", "sha256"}]).
    prediction: "eps" or "v" instead of the config's (`convert.prediction`); an SD 2.x file whose config is inferred
    gets "prediction_note" in the metadata: which prediction type and why.
    """
    import jax
    from tqdm.auto import tqdm

    from convert.detect import detect_kind, infer_config, prediction_note
    from convert.prediction import with_prediction
    from convert.lora import apply_loras, normalise_loras
    from convert.readers import sha256_file
    from convert.mapping import has_ema, normalise_keys, state_dict_to_params
    from convert.orbax_io import check_output_dir, write_converted
    from convert.readers import read_state_dict
    from convert.vae_file import report_counts, vae_params
    from ldm_jax import __version__
    from ldm_jax.cli import bake
    from ldm_jax.loading import as_dtype, file_config
    from ldm_jax.models.build import abstract_params
    from ldm_jax.stable_diffusion import StableDiffusion

    src, out_dir = os.fspath(src), os.fspath(out_dir)
    if not src:
        raise UserError("the source file path is empty")
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    check_output_dir(out_dir, overwrite)
    vae = None if vae is None else os.fspath(vae)
    loras = normalise_loras(loras)
    bake.check_files(vae, loras)  # missing, unreadable, diffusers-layout, not a kohya LoRA: before SRC is read
    if os.path.commonpath([os.path.abspath(src), os.path.abspath(out_dir)]) == os.path.abspath(out_dir):
        raise UserError(f"{src}: the source file is inside OUT_DIR {out_dir}; choose another OUT_DIR")
    state_dict = normalise_keys(read_state_dict(src))
    declared = config or file_config(src)
    config = with_prediction(declared, prediction) if declared else infer_config(state_dict, prediction)
    kind = detect_kind(state_dict, config.schedule.prediction)  # sd2 / sd2-v: what the model predicts
    note = None if declared else prediction_note(state_dict, prediction)  # SD 2.x: eps or v, and why
    bake.check_files(vae, loras, config)  # their shapes against the architecture, before hashing and converting
    for message in schedule_warnings(state_dict, config.schedule):
        (warn or print)(message)
    size = os.path.getsize(src)
    show = progress if progress is not None else (sys.stderr.isatty() and size >= PROGRESS_MIN_BYTES)
    digest = sha256_file(src, show)

    ema_available = has_ema(state_dict)
    shapes = abstract_params(config)
    cpu = jax.devices("cpu")[0]
    place = lambda a: jax.device_put(a, cpu)  # noqa: E731
    target = np.dtype(as_dtype(DTYPES[dtype]))
    work = bake.work_dtype(target, bake.stored_dtype(state_dict), loras)  # merge LoRAs before narrowing
    with tqdm(total=len(jax.tree_util.tree_leaves(shapes)), desc="converting", unit="tensor", disable=not show,
              leave=False) as bar:
        params, report = state_dict_to_params(
            state_dict, shapes, ema=ema, dtype=work, allow_unexpected=allow_unexpected,
            allow_nonfinite=allow_nonfinite, place=place, progress=lambda _: bar.update())
    extra = bake.record(vae, loras, bake.earlier_record(src), show)
    if vae is not None:
        params["vae"], vae_report = vae_params(vae, shapes["vae"], dtype=work, place=place,
                                               allow_unexpected=allow_unexpected, allow_nonfinite=allow_nonfinite)
        extra["vae_report"] = report_counts(vae_report)
    if loras:
        params = apply_loras(StableDiffusion(config, params), loras).params
        if work != target:
            params = bake.cast_params(params, target, place)
    metadata = {
        "source": os.path.basename(src), "source_size": size, "source_sha256": digest, "kind": kind,
        "config_name": config.name, "ema": report.used_ema, "ema_available": ema_available,
        **({"prediction_note": note} if note else {}),
        "ldm_jax_version": __version__, "converter": "ldm-jax convert",
        "report": report_counts(report), **extra,
    }
    if show:
        print(f"writing {out_dir} ...", file=sys.stderr)
    write_converted(out_dir, config, params, metadata, overwrite=overwrite)
    text = {"vae_report_text": vae_report.summary()} if vae is not None else {}
    return {**metadata, "dtype": DTYPES[dtype], **text}, report



# ------------------------------------------------------------------------------------------------- schedule


def compvis_schedule_buffers(cfg: ScheduleConfig) -> dict[str, np.ndarray]:
    """The buffers CompVis' DDPM.register_schedule stores, in float64 (v_posterior = 0)."""
    from ldm_jax.schedules import make_betas

    betas = make_betas(cfg)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    return {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac), "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }


def schedule_warnings(state_dict: Mapping[str, object], cfg: ScheduleConfig) -> list[str]:
    """One line per schedule buffer of the file that differs from the recomputed schedule by more than 1e-6
    relative (or the rounding of the file's dtype, for fp16/bf16 files)."""
    reference = compvis_schedule_buffers(cfg)
    out = []
    for name, ref in reference.items():
        value = state_dict.get(name)
        if value is None:
            continue
        what = f"schedule buffer {name!r}"
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
            out.append(f"{what} is not a floating-point tensor; ignored")
            continue
        if value.shape != ref.shape:
            out.append(f"{what} has shape {value.shape}, the {cfg.kind} schedule has {ref.shape}; "
                       "the converted model uses the recomputed schedule")
            continue
        tol = max(SCHEDULE_RTOL, float(np.finfo(value.dtype).eps))
        a = value.astype(np.float64)
        err = np.abs(a - ref)
        bad = ~(err <= tol * np.abs(ref))
        if bad.any():
            rel = float(np.max(err[bad] / np.maximum(np.abs(ref[bad]), np.finfo(np.float64).tiny)))
            out.append(f"{what} differs from the recomputed {cfg.kind} schedule (beta {cfg.beta_start}..{cfg.beta_end}"
                       f", {cfg.n_steps} steps) by up to {rel:.3g} relative at {int(bad.sum())} of {bad.size} "
                       "entries; the converted model uses the recomputed schedule")
    return out
