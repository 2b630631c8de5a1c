"""Standalone autoencoder (VAE) files: swap the `vae` weights of a model for those of a fine-tuned VAE.

Stable Diffusion users replace the autoencoder with a fine-tuned one (`vae-ft-mse-840000-ema-pruned.safetensors`
/ `.ckpt`: A1111's "SD VAE" setting, diffusers' `vae=`). Such a file holds the CompVis autoencoder tensors either
bare (`encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`: the VAE files) or with the
`first_stage_model.` prefix (a full SD checkpoint given as a VAE source: its autoencoder part is taken).

Every tensor of the file is mapped exactly once (the key table of `convert.keys`, shapes asserted against the
model's autoencoder config) or ignored with its reason in the MappingReport: the training-only loss of the .ckpt
versions (`loss.*`: discriminator, LPIPS, logvar), EMA bookkeeping (`model_ema.decay`, `model_ema.num_updates`;
other `model_ema.*` copies are reported as not used: "-ema-pruned" files already hold the EMA weights as their
own) and, in a full checkpoint, everything that is not `first_stage_model.*`. Anything else is unexpected (an error
unless allowed), as for whole checkpoints. A diffusers-layout VAE (`encoder.down_blocks.*`, `decoder.up_blocks.*`)
is refused in one line naming the layout expected. No torch; the file is read by `convert.readers` (memory-mapped,
no code from the file runs).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np

from convert.errors import CheckpointError
from convert.keys import PREFIXES
from convert.mapping import LOSS_REASON, MappingReport, state_dict_to_params
from convert.readers import labelled, read_labelled

FULL_PREFIX = PREFIXES["vae"]  # "first_stage_model."
_COMPVIS = re.compile(r"^(encoder|decoder)\.(conv_in|down|up|mid|norm_out|conv_out)\.|^(post_)?quant_conv\.")
_DIFFUSERS = re.compile(r"^(first_stage_model\.|vae\.)?(encoder|decoder)\.(down_blocks|up_blocks|mid_block|"
                        r"conv_norm_out)\.")
EXPECTED_LAYOUT = ("the CompVis layout (encoder.down.N.block.M.*, decoder.up.N.*, quant_conv.*, post_quant_conv.*, "
                   "bare or under first_stage_model.; as in vae-ft-mse-840000-ema-pruned.safetensors)")
_IGNORED = [
    (re.compile(r"^(first_stage_model\.)?loss\."), LOSS_REASON),
    (re.compile(r"^model_ema\.(decay|num_updates)$"), "EMA bookkeeping"),
    (re.compile(r"^model_ema\."), "EMA copy not used (the file's own autoencoder weights are loaded)"),
]
NOT_VAE_REASON = "not the autoencoder (the VAE is taken from the file's first_stage_model.* tensors)"


def _where(path: str, message: str) -> str:
    return labelled("VAE file", path, message)


def read_vae_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The flat state dict of a VAE file (.safetensors or .ckpt), errors as one line naming it as the VAE file."""
    return read_labelled(path, "VAE file", "a .safetensors or .ckpt VAE file")


def vae_prefix(path: str, state_dict: Mapping[str, object]) -> str:
    """"" for bare autoencoder keys, "first_stage_model." for a full checkpoint's; refuses the diffusers layout
    and files without autoencoder tensors, in one line."""
    diffusers = next((k for k in state_dict if _DIFFUSERS.match(k)), None)
    if diffusers is not None:
        raise CheckpointError(_where(path, f"is a diffusers-layout VAE ({diffusers}); expected {EXPECTED_LAYOUT}"))
    if any(k.startswith(FULL_PREFIX) and _COMPVIS.match(k[len(FULL_PREFIX):]) for k in state_dict):
        return FULL_PREFIX
    if any(_COMPVIS.match(k) for k in state_dict):
        return ""
    from convert.file_kinds import describe

    kind = describe(state_dict)  # a LoRA, an embedding, a diffusers U-Net, ...: say which
    if kind is not None:
        raise CheckpointError(_where(path, f"has no autoencoder tensors: {kind.split(';')[0]}"))
    example = next(iter(state_dict), None)
    found = f"e.g. {example}" if example else "no tensors at all"
    raise CheckpointError(_where(path, f"has no autoencoder tensors ({found}); expected {EXPECTED_LAYOUT}"))


def split_keys(state_dict: Mapping[str, object], prefix: str) -> tuple[dict, dict[str, str]]:
    """(the tensors to map, {ignored key: reason}). Keys neither mapped nor ignorable stay in the first dict, where
    the mapping reports them as unexpected."""
    keep, ignored = {}, {}
    for key, value in state_dict.items():
        reason = next((r for pattern, r in _IGNORED if pattern.search(key)), None)
        if reason is None and prefix and not key.startswith(prefix):
            reason = NOT_VAE_REASON
        if reason is None:
            keep[key] = value
        else:
            ignored[key] = reason
    return keep, ignored


def vae_params(path: str | os.PathLike, vae_shapes, *, dtype=np.float32, place=None, allow_unexpected: bool = False,
               allow_nonfinite: bool = False):
    """The `vae` parameter tree of the VAE file `path` for a model whose autoencoder has the shapes `vae_shapes`
    (`abstract_params(config)["vae"]`), in `dtype`, each tensor passed through `place` (e.g. `jax.device_put`).
    Returns (tree, MappingReport). A missing tensor or a shape that is not the model's is a CheckpointError naming
    the tensor."""
    path = os.fspath(path)
    state_dict = read_vae_state_dict(path)
    prefix = vae_prefix(path, state_dict)
    keep, ignored = split_keys(state_dict, prefix)
    try:
        params, report = state_dict_to_params(keep, {"vae": vae_shapes}, ema=False, dtype=np.dtype(dtype),
                                              allow_unexpected=allow_unexpected, allow_nonfinite=allow_nonfinite,
                                              place=place, prefixes={"vae": prefix})
    except CheckpointError as e:
        misfit = str(e).startswith("missing tensor") or ": shape (" in str(e)
        hint = f" (the VAE must fit the model's autoencoder: {_describe(vae_shapes)})" if misfit else ""
        raise CheckpointError(_where(path, f"{e}{hint}")) from None
    report.ignored.update(ignored)
    return params["vae"], report


def _describe(vae_shapes) -> str:
    """The latent and base channels of the model's autoencoder, from its parameter shapes."""
    return (f"{vae_shapes['quant_conv']['kernel'].shape[-1] // 2} latent channels, "
            f"{vae_shapes['encoder']['conv_in']['kernel'].shape[-1]} base channels")


def check_vae_file(path: str | os.PathLike, config=None) -> None:
    """Fail early (before a model is loaded or compiled) on a VAE file that is missing, unreadable, of the
    diffusers layout, without autoencoder tensors, or (when the model's `config` is known) of other shapes.
    Reads only the file's index: safetensors and .ckpt tensors are memory-mapped, not converted."""
    path = os.fspath(path)
    state_dict = read_vae_state_dict(path)
    prefix = vae_prefix(path, state_dict)
    if config is None:
        return
    from convert.keys import key_table
    from ldm_jax.models.build import abstract_params

    for entry in key_table("vae", abstract_params(config)["vae"], prefix):
        value = state_dict.get(entry.key)
        if value is None:
            raise CheckpointError(_where(path, f"missing tensor {entry.key}"))
        ok = {entry.compvis_shape}
        if entry.layout == "conv" and entry.flax_shape[:2] == (1, 1):
            ok.add(entry.compvis_shape[:2])
        if tuple(value.shape) not in ok:
            raise CheckpointError(_where(path, f"{entry.key}: shape {tuple(value.shape)} does not match the model's "
                                               f"{entry.compvis_shape} (the VAE must fit the model's autoencoder)"))


def swap_vae(sd, path: str | os.PathLike, *, allow_unexpected: bool = False, allow_nonfinite: bool = False):
    """A copy of the StableDiffusion `sd` whose `vae` weights are those of the VAE file `path` (in the dtype of
    `sd`'s own autoencoder weights, on the default device); `metadata["vae"]` is the file's base name and
    `metadata["vae_report"]` the MappingReport's summary. U-Net and text encoder are shared, not copied."""
    import jax

    from ldm_jax.models.build import abstract_params

    path = os.fspath(path)
    dtype = np.dtype(jax.tree_util.tree_leaves(sd.params["vae"])[0].dtype)
    tree, report = vae_params(path, abstract_params(sd.config)["vae"], dtype=dtype, place=jax.device_put,
                              allow_unexpected=allow_unexpected, allow_nonfinite=allow_nonfinite)
    metadata = {**sd.metadata, "vae": os.path.basename(path), "vae_report": report.summary()}
    return sd.replace(params={**sd.params, "vae": tree}, metadata=metadata)


def report_counts(report: MappingReport) -> dict:
    """The MappingReport as the JSON counts a converted directory's metadata keeps."""
    ignored: dict[str, int] = {}
    for reason in report.ignored.values():
        ignored[reason] = ignored.get(reason, 0) + 1
    return {"mapped": len(report.mapped), "ignored": ignored, "unexpected": list(report.unexpected)}
