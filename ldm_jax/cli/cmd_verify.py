"""`ldm-jax verify SRC`: check a checkpoint's Flax outputs against the torch reference.

Loads SRC (CompVis .ckpt / .safetensors, SDXL's sgm layout, or a converted directory) with `ldm_jax.load`, builds
the torch reference (labml U-Net and autoencoder, transformers CLIPTextModel; for SD 2.x and SDXL, whose U-Nets
labml cannot build, diffusers' UNet2DConditionModel, and the OpenCLIP text towers as transformers' CLIP models,
through diffusers' own single-file conversions; SDXL's U-Net with its vector conditioning, its second text encoder's
pooled output too) with the file's own tensors, runs every
component on random inputs in fp32 and prints the max relative error of each output; for a file, a "weights"
row per component also compares the loaded parameters with the file's tensors and names the one that differs
most (a converted directory's torch side gets its own parameters: the source file is not at hand). Exit
status 0 iff every error is within the tolerance, 1 otherwise (the last line names the worst row). Needs the
`torch` extra and labml-nn (see README).

A file without a stored config gets its architecture inferred from tensor shapes, as `ldm-jax convert` does;
--preset / --config name it instead (small models can be ambiguous). Latent sides must be multiples of the
U-Net's downsampling factor (8 for SD 1.x), as the torch reference requires.
"""

from __future__ import annotations

import argparse
import os

from ldm_jax.configs import PRESETS
from ldm_jax.errors import UserError

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")  # the last: SDXL's only


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="CompVis .ckpt/.safetensors or a directory from `ldm-jax convert`")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="use the EMA U-Net weights (default: when present)")
    p.add_argument("--components", default=None,
                   help=f"comma-separated subset of {','.join(COMPONENTS)} (default: all of the model's)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="max relative error of the outputs, > 0 (default: 1e-4; loaded weights must equal the file's)")
    p.add_argument("--latent-size", default="16x24", help="latent HxW of the random inputs (default: 16x24)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs, >= 0 (default: 0)")
    arch = p.add_mutually_exclusive_group()
    arch.add_argument("--preset", choices=sorted(PRESETS), help="architecture preset instead of inferring it")
    arch.add_argument("--config", metavar="CONFIG.json", help="architecture (ModelConfig JSON) instead of inferring it")
    p.add_argument("--allow-unexpected", action="store_true", help="ignore tensors the model does not use")
    p.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/Inf weights (parity then fails)")
    p.set_defaults(func=run)


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--latent-size must look like 16x24, got {text!r}") from None
    if h < 1 or w < 1:
        raise UserError(f"--latent-size must be positive, got {text!r}")
    return h, w


def _check_components(config, components) -> None:
    """--components naming a part the model lacks (text_encoder_2 of a model with one text encoder)."""
    from ldm_jax.models.build import components_of

    lacking = [c for c in components or () if c not in components_of(config)]
    if lacking:
        raise UserError(f"--components: this {config.name} model has no {', '.join(lacking)} (only SDXL models "
                        f"have text_encoder_2); choose from {', '.join(components_of(config))}")


def check_latent_size(size: tuple[int, int], config, components) -> None:
    """The torch U-Net halves the latent once per level after the first: its sides must be multiples of that."""
    if components is not None and "unet" not in components:
        return
    factor = 2 ** (len(config.unet.channel_multipliers) - 1)
    if any(v % factor for v in size):
        raise UserError(f"--latent-size {size[0]}x{size[1]}: both sides must be multiples of {factor} for this "
                        f"model's U-Net ({config.name}), e.g. {2 * factor}x{3 * factor}")


def _known_config(src: str, config):
    """The architecture, if known without loading the weights (to check --latent-size early), else None."""
    from convert.orbax_io import is_converted_dir, read_info
    from ldm_jax.loading import file_config

    if config is not None:
        return config
    if os.path.isdir(src):
        return read_info(src)[0] if is_converted_dir(src) else None
    return file_config(src) if os.path.isfile(src) else None


def run(args) -> int:
    components = None if args.components is None else tuple(
        c.strip() for c in args.components.split(",") if c.strip())
    bad = [c for c in components or () if c not in COMPONENTS]
    if bad or components == ():
        raise UserError(f"--components: unknown {', '.join(bad) or 'empty list'}; choose from {', '.join(COMPONENTS)}")
    size = _size(args.latent_size)
    if not 0 < args.tolerance < float("inf"):  # NaN too
        raise UserError(f"--tolerance must be a positive finite number, got {args.tolerance}")
    if args.seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {args.seed}")
    from convert.torch_reference import import_torch
    from convert.readers import read_state_dict
    from convert.verify import format_table, summary, verify
    from ldm_jax.cli.cmd_convert import config_from_args

    config = config_from_args(args.preset, args.config)
    if config is not None and os.path.isdir(args.src):
        raise UserError(f"{args.src}: a converted directory stores its architecture; --preset/--config apply to "
                        "checkpoint files")
    known = _known_config(args.src, config)
    if known is not None:
        check_latent_size(size, known, components)
        _check_components(known, components)
    import_torch()  # fail early, before loading gigabytes, if the reference is not installed
    import ldm_jax

    sd = ldm_jax.load(args.src, ema=args.ema, config=config, allow_unexpected=args.allow_unexpected,
                      allow_nonfinite=args.allow_nonfinite, progress=True)
    check_latent_size(size, sd.config, components)
    _check_components(sd.config, components)
    print(f"loaded {args.src}: {sd.config.name}" + (", EMA U-Net" if sd.metadata.get("ema") else ""))
    reference = None if os.path.isdir(args.src) else read_state_dict(args.src)  # memory-mapped, read as needed
    rows = verify(sd, components=components, tolerance=args.tolerance, latent_hw=size, seed=args.seed,
                  reference=reference)
    print(format_table(rows))
    print(summary(rows))
    return 0 if all(r.ok for r in rows) else 1
