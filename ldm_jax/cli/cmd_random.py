"""`ldm-jax random-checkpoint`: a CompVis-layout .safetensors with random weights of a preset.

For demos, benchmarks and `ldm-jax verify` without downloading weights. Weights are Flax's initialisers
with every tensor perturbed (so norm scales, biases and zero-initialised layers are not trivial). The
config is stored in the file's metadata, so `ldm_jax.load` needs no `--preset` to read it back.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from convert.mapping import params_to_state_dict
from convert.safetensors_io import write_safetensors
from ldm_jax.configs import PRESETS, preset
from ldm_jax.errors import UserError
from ldm_jax.loading import CONFIG_METADATA_KEY
from ldm_jax.models.build import init_params

_STORE = {"fp32": np.float32, "fp16": np.float16}


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT.safetensors", help="file to write (atomically)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="architecture (default: tiny)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--dtype", default="fp32", choices=sorted(_STORE), help="stored dtype (default: fp32)")
    p.set_defaults(func=run)


def random_params(config, seed: int, perturb: float = 0.05):
    """Flax-initialised params with every leaf perturbed by perturb * max(mean|w|, 0.02) * N(0, 1)."""
    params = init_params(config, jax.random.key(seed))
    rng = np.random.default_rng(seed)

    def jitter(w):
        w = np.asarray(w)
        return (w + perturb * max(float(np.abs(w).mean()), 0.02) * rng.standard_normal(w.shape)).astype(np.float32)

    return jax.tree_util.tree_map(jitter, params)


def run(args) -> int:
    if not args.out.endswith(".safetensors"):
        raise UserError(f"{args.out}: the output must be a .safetensors file")
    config = preset(args.preset)
    state_dict = params_to_state_dict(random_params(config, args.seed), dtype=_STORE[args.dtype])
    write_safetensors(args.out, state_dict, {CONFIG_METADATA_KEY: config.to_json(), "format": "pt"})
    print(f"wrote {args.out}: random {config.name} weights ({len(state_dict)} tensors, {args.dtype}, seed {args.seed})")
    return 0
