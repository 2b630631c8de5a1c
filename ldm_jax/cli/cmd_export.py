"""`ldm-jax export CONVERTED_DIR OUT.safetensors`: a converted directory -> one CompVis-layout .safetensors file.

    ldm-jax export sd-v1-4/ sd-v1-4.safetensors [--dtype fp32|fp16|bf16]

The file holds the model tensors under their CompVis names and layouts (`convert.mapping.params_to_state_dict`:
OIHW convolutions, [out, in] linears, `cond_stage_model.transformer.text_model.*`), so torch tools load it
(labml, diffusers' single-file loader, A1111/ComfyUI-style loaders); an EMA-converted directory exports its EMA
U-Net as the model weights. The safetensors `__metadata__` carries `"format": "pt"` (torch layout, as Hugging Face
tools expect), the config JSON under `ldm_jax.config` (so `ldm_jax.load(file)` needs no inference) and where the
weights came from. Written atomically (`convert.safetensors_io.write_safetensors`). An fp32 export of an fp32
conversion reproduces the source file's model tensors bit for bit.

Refused with one line: an output name not ending in .safetensors, an output inside CONVERTED_DIR, a damaged
directory, and (--dtype fp16) a weight too large for fp16, which would otherwise become Inf.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ldm_jax.cli.cmd_convert import DTYPES, cpu_only_unless_initialised


def add_parser(subparsers, name: str, help: str) -> None:
    p = subparsers.add_parser(name, help=help, description=__doc__.split("\n\n")[0])
    p.add_argument("converted_dir", metavar="CONVERTED_DIR", help="directory written by `ldm-jax convert`")
    p.add_argument("out", metavar="OUT.safetensors", help="file to write (replaced atomically if it exists)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="tensor dtype in the file (default: the dtype the directory stores)")
    p.set_defaults(func=run)


def run(args) -> int:
    cpu_only_unless_initialised()
    metadata = export_checkpoint(args.converted_dir, args.out, dtype=args.dtype)
    print(f"exported {args.converted_dir} -> {args.out}: {metadata['ldm_jax.tensors']} tensors, "
          f"{metadata['ldm_jax.dtype']}")
    return 0


def export_checkpoint(converted_dir, out, dtype: str | None = None) -> dict[str, str]:
    """Write the CompVis-layout .safetensors; returns the `__metadata__` it wrote."""
    from convert.errors import CheckpointError
    from convert.mapping import params_to_state_dict
    from convert.orbax_io import read_converted, read_info
    from convert.safetensors_io import check_output_path, write_safetensors
    from ldm_jax import __version__
    from ldm_jax.loading import CONFIG_METADATA_KEY, as_dtype

    converted_dir, out = os.fspath(converted_dir), os.fspath(out)
    if not converted_dir:
        raise CheckpointError("the converted directory path is empty")
    if not out:
        raise CheckpointError("the output file path is empty")
    if not os.path.lexists(converted_dir):
        raise CheckpointError(f"{converted_dir}: no such directory")
    if not os.path.isdir(converted_dir):
        raise CheckpointError(f"{converted_dir}: is a file; export takes a directory written by `ldm-jax convert` "
                              "(a checkpoint file needs no export)")
    source = os.path.realpath(converted_dir)
    if os.path.commonpath([source, os.path.realpath(out)]) == source:
        raise CheckpointError(f"{out}: is inside the converted directory {converted_dir}; write the file elsewhere")
    if not out.endswith(".safetensors") and not os.path.isdir(out):
        raise CheckpointError(f"{out}: the output must be a .safetensors file (export writes safetensors only)")
    check_output_path(out)  # before reading the weights
    config, info = read_info(converted_dir)
    target = np.dtype(as_dtype(DTYPES[dtype])) if dtype else None  # None: as stored
    sd = read_converted(converted_dir, param_dtype=info["dtype"])  # as stored: no upcast before the cast below
    state_dict = params_to_state_dict(sd.params, dtype=target)
    del sd
    name = np.dtype(next(iter(state_dict.values())).dtype).name
    metadata = {
        "format": "pt",
        CONFIG_METADATA_KEY: config.to_json(),
        "ldm_jax.version": __version__,
        "ldm_jax.layout": "compvis",
        "ldm_jax.dtype": name,
        "ldm_jax.tensors": str(len(state_dict)),
        "ldm_jax.kind": str(info.get("kind", "")),
        "ldm_jax.ema": json.dumps(bool(info.get("ema"))),
        "ldm_jax.source": str(info.get("source", "")),
        "ldm_jax.source_sha256": str(info.get("source_sha256", "")),
    }
    write_safetensors(out, state_dict, metadata)
    return metadata
