"""`ldm-jax bench`: benchmark with random weights of a preset (SD 1.x by default; no download needed).

Times the U-Net step with classifier-free guidance (1 and 8 images), the VAE decode, end-to-end txt2img
(50 DDIM steps, CFG 7.5) and, with --cold-warm, a new process's first image with a cold and a warm
persistent compilation cache. --torch also times labml's torch U-Net and VAE decoder (and diffusers', if
installed) in the same process on the same device (fp16 on CUDA, fp32 on CPU) and prints the ratios.
--train times one optimiser step of `ldm-jax train` instead (images/s and the compiled step's peak memory;
--images are global batch sizes, --remat rematerialises U-Net blocks, --lora-rank R times a LoRA on the frozen
U-Net instead; on the CPU a step whose peak exceeds the free memory is compiled and reported but not run). Prints a
table and writes JSON (--json). --memory compiles the txt2img program for each --images count from shapes alone
(no weights, no run) and reports XLA's peak memory for it: how many images fit on a device, even one that could not
run them.
Defaults: bf16 at 512x512 with 1 and 8 images on GPU/TPU; fp32, one image at 256x256 (32x32 latents), no
end-to-end run on CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os

from ldm_jax.errors import UserError


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd1", help="model preset (default: sd1)")
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), help="compute dtype (default: bf16 on "
                   "GPU/TPU, fp32 on CPU)")
    p.add_argument("--images", help="comma-separated image counts (default: 1,8 on GPU/TPU, 1 on CPU)")
    p.add_argument("--size", type=int, help="image side in pixels (default: 512 on GPU/TPU, 256 on CPU)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps for end-to-end runs (default: 50)")
    p.add_argument("--iters", type=int, default=5, help="timed repetitions (median; default: 5)")
    p.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=None,
                   help="end-to-end txt2img timing (default: on for GPU/TPU, off on CPU)")
    p.add_argument("--torch", action="store_true", help="also time labml's torch U-Net and VAE decoder (and "
                   "diffusers', if installed) on the same device")
    p.add_argument("--cold-warm", action="store_true", help="time a new process's first image, cold and warm cache")
    p.add_argument("--train", action="store_true", help="time the training step instead (images/s, peak memory; "
                   "--images are global batch sizes)")
    p.add_argument("--memory", action="store_true", help="compile-only peak memory of the txt2img program per "
                   "--images count (no weights, no run)")
    p.add_argument("--remat", action="store_true", help="with --train: rematerialise U-Net blocks")
    p.add_argument("--lora-rank", type=int, default=0, metavar="R", help="with --train: time a LoRA of rank R on "
                   "the frozen U-Net's attention (`ldm-jax train --lora-rank`) instead of full fine-tuning")
    p.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    p.set_defaults(func=run)


_WHAT = {"unet_step_cfg": "U-Net step", "vae_decode": "VAE decode"}
_PEER = {"labml-torch": "labml torch", "diffusers": "diffusers torch"}


def ratio_lines(rows) -> list[str]:
    """'U-Net step, 1 image(s): ldm-jax / labml torch = 0.76x' for every torch row with an ldm-jax twin."""
    ours = {(r.what, r.images): r.seconds for r in rows if r.impl == "ldm-jax"}
    return [f"{_WHAT[r.what]}, {r.images} image(s): ldm-jax / {_PEER[r.impl]} = "
            f"{ours[r.what, r.images] / r.seconds:.2f}x"
            for r in rows if r.impl in _PEER and (r.what, r.images) in ours]


def _no_nan(x):
    """NaN / Inf floats (timings not taken) -> None, anywhere in lists and dicts."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_no_nan(v) for v in x]
    return x


def run(args) -> int:
    import jax

    from ldm_jax.bench import format_rows, rows_as_dicts, run_bench
    from ldm_jax.configs import PRESETS

    if args.preset not in PRESETS:
        raise UserError(f"unknown preset {args.preset!r}; choose from {', '.join(PRESETS)}")
    if PRESETS[args.preset]().is_inpainting:
        base = args.preset.removesuffix("-inpaint")
        raise UserError(f"--preset {args.preset}: an inpainting U-Net only inpaints, and the bench times txt2img and "
                        f"training; bench --preset {base} (the same U-Net but for its first conv)")
    accel = jax.default_backend() != "cpu"
    try:
        images = tuple(int(v) for v in (args.images or ("1,8" if accel else "1")).split(","))
    except ValueError:
        raise UserError(f"--images must be comma-separated integers, got {args.images!r}") from None
    size = (512 if accel else 256) if args.size is None else args.size
    if args.dtype == "float16" and not accel:  # XLA: "F16_F16_F32 is not supported by dot_general on CPU"
        raise UserError("--dtype float16 cannot run on the CPU backend (XLA's CPU matmul has no float16 precision); "
                        "use --dtype float32 or bfloat16")
    for flag, value in (("--images", min(images)), ("--steps", args.steps), ("--iters", args.iters),
                        ("--size", size)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.train:  # the training step's own rule (a multiple of the U-Net's total downsampling), named as --size
        from ldm_jax.configs import preset
        from ldm_jax.train.base import check_resolution, check_trainable

        check_trainable(preset(args.preset))
        try:
            check_resolution(preset(args.preset), size)
        except UserError as e:
            raise UserError(str(e).replace("--resolution", "--size")) from None
    elif size % 64:
        raise UserError(f"--size must be a multiple of 64, got {size}")
    if args.memory and (args.train or args.remat or args.torch or args.cold_warm):
        raise UserError("--memory only compiles the txt2img program; it cannot be combined with --train, --remat, "
                        "--torch or --cold-warm")
    if args.remat and not args.train:
        raise UserError("--remat applies to --train only")
    if args.lora_rank and not args.train:
        raise UserError("--lora-rank applies to --train only")
    if args.lora_rank < 0:
        raise UserError(f"--lora-rank must be >= 0, got {args.lora_rank}")
    if args.json:  # before the benchmark, not after it
        folder = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json):
            raise UserError(f"--json {args.json}: is a directory, expected a file name")
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(f"--json {args.json}: cannot write a file there ({folder} "
                            + ("is not a writable folder)" if os.path.isdir(folder) else "does not exist)"))
    rows = run_bench(preset_name=args.preset, dtype=args.dtype or ("bfloat16" if accel else "float32"),
                     images=images, size=size, steps=args.steps, iters=args.iters,
                     e2e=accel if args.e2e is None else args.e2e, torch_ref=args.torch, cold_warm=args.cold_warm,
                     train=args.train, remat=args.remat, memory=args.memory, lora_rank=args.lora_rank)
    print(format_rows(rows))
    for line in ratio_lines(rows):
        print(line)
    if args.json:
        tmp = f"{args.json}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w") as f:  # strict JSON: a skipped timing (NaN) is null
                json.dump(_no_nan(rows_as_dicts(rows)), f, indent=1, allow_nan=False)
            os.replace(tmp, args.json)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        print(f"wrote {args.json}")
    return 0
