"""`ldm-jax random-checkpoint`: a CompVis-layout .safetensors with random weights of a preset (SDXL presets: sgm's
layout, as `sd_xl_base_1.0.safetensors`).

For demos, benchmarks and `ldm-jax verify` without downloading weights (`ldm_jax.models.build.random_params`:
LeCun-normal kernels, unit norm scales, zero biases, every tensor perturbed). The config is stored in the
file's metadata, so `ldm_jax.load` needs no `--preset` to read it back.
"""

from __future__ import annotations

import argparse

import numpy as np

from convert.keys import layout_of
from convert.mapping import params_to_state_dict
from convert.safetensors_io import check_output_path, write_safetensors
from ldm_jax.configs import PRESETS, preset
from ldm_jax.errors import UserError
from ldm_jax.loading import CONFIG_METADATA_KEY
from ldm_jax.models.build import random_params

_STORE = {"fp32": np.float32, "fp16": np.float16}


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT.safetensors", help="file to write (atomically; an existing file is replaced)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="architecture (default: tiny)")
    p.add_argument("--seed", type=int, default=0, help="random seed, >= 0 (default: 0)")
    p.add_argument("--dtype", default="fp32", choices=sorted(_STORE), help="stored dtype (default: fp32)")
    p.set_defaults(func=run)


def run(args) -> int:
    if not args.out.endswith(".safetensors"):
        raise UserError(f"{args.out}: the output must be a .safetensors file")
    if args.seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {args.seed}")
    check_output_path(args.out)  # before the weights (SD 1.x: ~20 s and 4 GB)
    config = preset(args.preset)
    state_dict = params_to_state_dict(random_params(config, args.seed), dtype=_STORE[args.dtype],
                                      text_layout=layout_of(config))
    write_safetensors(args.out, state_dict, {CONFIG_METADATA_KEY: config.to_json(), "format": "pt"})
    print(f"wrote {args.out}: random {config.name} weights ({len(state_dict)} tensors, {args.dtype}, seed {args.seed})")
    return 0
