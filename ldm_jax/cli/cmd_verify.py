"""`ldm-jax verify SRC`: check a checkpoint's Flax outputs against the torch reference.

Loads SRC (CompVis .ckpt / .safetensors, or a converted directory) with `ldm_jax.load`, builds the torch
reference (labml U-Net and autoencoder, transformers CLIPTextModel) with the same weights, runs every
component on random inputs in fp32 and prints the max relative error of each output. Exit status 0 iff
every error is within the tolerance. Needs the `torch` extra and labml-nn (see README).
"""

from __future__ import annotations

import argparse

from ldm_jax.errors import UserError

COMPONENTS = ("unet", "vae", "text_encoder")


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="CompVis .ckpt/.safetensors or a directory from `ldm-jax convert`")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="use the EMA U-Net weights (default: when present)")
    p.add_argument("--components", default=",".join(COMPONENTS),
                   help="comma-separated subset of unet,vae,text_encoder (default: all)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max relative error allowed (default: 1e-4)")
    p.add_argument("--latent-size", default="16x24", help="latent HxW of the random inputs (default: 16x24)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--latent-size must look like 16x24, got {text!r}") from None
    if h < 1 or w < 1:
        raise UserError(f"--latent-size must be positive, got {text!r}")
    return h, w


def run(args) -> int:
    components = tuple(c.strip() for c in args.components.split(",") if c.strip())
    bad = [c for c in components if c not in COMPONENTS]
    if bad or not components:
        raise UserError(f"--components: unknown {', '.join(bad) or 'empty list'}; choose from {', '.join(COMPONENTS)}")
    size = _size(args.latent_size)
    from convert.torch_reference import import_torch
    from convert.verify import format_table, verify

    import_torch()  # fail early, before loading gigabytes, if the reference is not installed
    import ldm_jax

    sd = ldm_jax.load(args.src, ema=args.ema, progress=True)
    print(f"loaded {args.src}: {sd.config.name}" + (", EMA U-Net" if sd.metadata.get("ema") else ""))
    rows = verify(sd, components=components, tolerance=args.tolerance, latent_hw=size, seed=args.seed)
    print(format_table(rows))
    ok = all(r.ok for r in rows)
    print("parity OK" if ok else "parity FAILED")
    return 0 if ok else 1
