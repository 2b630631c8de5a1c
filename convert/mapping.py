"""CompVis state dict (name -> array) <-> Flax parameter trees, strictly.

Every checkpoint tensor is either mapped exactly once (by the table in `convert.keys`, shape asserted),
or on an explicit ignore list with its reason; anything else is "unexpected" (an error unless allowed).
A missing key, a wrong shape, a non-array value, a NaN/Inf weight or a finite weight too large for the target
dtype (fp16 overflows to Inf) is an error naming the key. Error hints name both ways to relax a check (the
`ldm-jax convert` flag and the Python keyword), since the same messages reach `ldm_jax.load`, `verify` and the
sampling commands.
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

from convert.errors import CheckpointError
from convert.readers import release_pages
from convert.keys import PREFIXES, SGM, SGM_CONDITIONER, SGM_OPEN_CLIP, SGM_OPEN_CLIP_PREFIX, Entry, key_table
from convert.keys import take_part, to_compvis_layout, to_flax_layout
from convert.open_clip_keys import IGNORED as OPEN_CLIP_IGNORED, PREFIX as OPEN_CLIP_PREFIX
from convert.open_clip_keys import SDXL_IGNORED, SDXL_PREFIX

# Schedule buffers CompVis' DDPM registers (recomputed from the config instead).
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
LOSS_REASON = "autoencoder training loss (LPIPS / discriminator)"
_IGNORED = [
    (re.compile(r"^(%s)$" % "|".join(SCHEDULE_BUFFERS)), "noise schedule buffer (recomputed from the config)"),
    (re.compile(r"^logvar$"), "training-only learned log-variance"),
    (re.compile(r"^(cond_stage_model|conditioner\.embedders\.0)\.transformer\.text_model\.embeddings\.position_ids$"),
     "position ids (arange)"),
    (re.compile(r"^model_ema\.(decay|num_updates)$"), "EMA bookkeeping"),
    (re.compile(r"^first_stage_model\.loss\."), LOSS_REASON),
] + [(re.compile("^" + re.escape(prefix + name) + "$"), reason)  # OpenCLIP towers: SD 2.x's, SDXL's second
      for prefix, ignored in ((OPEN_CLIP_PREFIX, OPEN_CLIP_IGNORED), (SDXL_PREFIX, SDXL_IGNORED),
                              (SGM_OPEN_CLIP_PREFIX, SDXL_IGNORED))  # the SDXL refiner's bigG: as SDXL's
      for name, reason in ignored.items()]
_FLOAT_DTYPES = {np.dtype(t) for t in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16)}
_OLD_CLIP = "cond_stage_model.transformer."


def normalise_keys(state_dict: Mapping[str, object]) -> dict[str, object]:
    """Accept the older CLIP layout (`cond_stage_model.transformer.encoder...` without `text_model.`)."""
    new = PREFIXES["text_encoder"]
    out = {}
    for k, v in state_dict.items():
        if k.startswith(_OLD_CLIP) and not k.startswith(new):
            k = new + k[len(_OLD_CLIP):]
        out[k] = v
    return out


def text_layout_of(state_dict: Mapping[str, object]) -> str:
    """Where the state dict keeps its text towers: "sgm" (SDXL, `conditioner.embedders.*`), "sgm_open_clip" (the
    SDXL refiner: OpenCLIP at `conditioner.embedders.0.model.*`), "open_clip" (SD 2.x, `cond_stage_model.model.*`)
    or "transformers" (SD 1.x, `cond_stage_model.transformer.*`; also when it has none)."""
    if any(k.startswith(SGM_CONDITIONER) for k in state_dict):
        return SGM_OPEN_CLIP if any(k.startswith(SGM_OPEN_CLIP_PREFIX) for k in state_dict) else SGM
    return "open_clip" if any(k.startswith(OPEN_CLIP_PREFIX) for k in state_dict) else "transformers"


def has_ema(state_dict: Mapping[str, object]) -> bool:
    return any(k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates")
               for k in state_dict)


@dataclass
class MappingReport:
    """What happened to every tensor of the checkpoint."""

    mapped: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)  # key -> reason
    unexpected: list[str] = field(default_factory=list)
    used_ema: bool = False

    def summary(self) -> str:
        reasons: dict[str, int] = {}
        for r in self.ignored.values():
            reasons[r] = reasons.get(r, 0) + 1
        lines = [f"mapped {len(self.mapped)} tensors" + (" (U-Net from EMA weights)" if self.used_ema else "")]
        lines += [f"ignored {n}: {r}" for r, n in sorted(reasons.items())]
        if self.unexpected:
            lines.append(f"unexpected {len(self.unexpected)}: " + ", ".join(self.unexpected[:5])
                         + (" ..." if len(self.unexpected) > 5 else ""))
        return "\n".join(lines)


def _ignore_reason(key: str) -> str | None:
    for pattern, reason in _IGNORED:
        if pattern.search(key):
            return reason
    return None


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def leaf_at(tree: Mapping, path: tuple[str, ...]):
    """tree[path[0]][path[1]]... (a Flax path of a key-table Entry)."""
    for p in path:
        tree = tree[p]
    return tree


def _convert_one(entry: Entry, key: str, value, dtype, allow_nonfinite: bool):
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise CheckpointError(f"{key}: expected a tensor, found {type(value).__name__}")
    arr = np.asarray(value)
    ok_shapes = {entry.stored_shape}
    if entry.layout == "conv" and entry.flax_shape[:2] == (1, 1):
        ok_shapes.add(entry.compvis_shape[:2])  # a Linear where CompVis has a 1x1 conv
    if tuple(arr.shape) not in ok_shapes:
        raise CheckpointError(f"{key}: shape {tuple(arr.shape)} does not match the model's {entry.stored_shape}")
    if arr.dtype not in _FLOAT_DTYPES:
        raise CheckpointError(f"{key}: expected a floating-point tensor, found {arr.dtype}")
    arr = take_part(entry, arr)  # q, k or v of a stacked in_proj: a view of its rows
    # relayout and cast in one pass into a fresh contiguous array (astype of the transposed view, then a
    # contiguous copy, made two passes and two allocations: 5.4 s against 2.8 s for SD 1.x fp16 on 2 cores)
    view = to_flax_layout(entry, arr)
    out = np.empty(view.shape, dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, not as a numpy warning
        np.copyto(out, view, casting="unsafe")
    if (_narrows(arr.dtype, out.dtype) or not allow_nonfinite) and not np.isfinite(out).all():
        check_fits(key, view, out)
        if not allow_nonfinite:
            raise CheckpointError(f"{key}: contains NaN or Inf values (to accept them: `ldm-jax convert "
                                  "--allow-nonfinite`, or allow_nonfinite=True in Python)")
    return out


def _narrows(source, target) -> bool:
    """Whether a cast from float dtype `source` to `target` can overflow (float32 -> float16, not the reverse)."""
    try:
        return bool(ml_dtypes.finfo(target).max < ml_dtypes.finfo(source).max)
    except ValueError:  # not floating point
        return False


def check_fits(key: str, source: np.ndarray, cast: np.ndarray) -> None:
    """CheckpointError if casting the finite values of `source` produced Inf in `cast` (e.g. |w| > 65504 in fp16)."""
    overflow = np.isfinite(source) & ~np.isfinite(cast)
    if overflow.any():
        biggest = float(np.abs(np.asarray(source, np.float64)[overflow]).max())
        raise CheckpointError(f"{key}: max |value| {biggest:.6g} does not fit {cast.dtype.name} (largest finite "
                              f"{float(ml_dtypes.finfo(cast.dtype).max):.6g}); use fp32 or bf16 instead")


def cast_checked(key: str, value: np.ndarray, dtype) -> np.ndarray:
    """`value` cast to `dtype`; a finite weight the cast turns into Inf (fp16: |w| > 65504) is a CheckpointError
    naming the tensor `key` (`check_fits`), never a silent Inf."""
    with np.errstate(over="ignore", invalid="ignore"):
        cast = value.astype(dtype)
    if _narrows(value.dtype, cast.dtype) and not np.isfinite(cast).all():
        check_fits(key, value, cast)
    return cast


def conversion_workers() -> int:
    """Threads that convert tensors while the caller places them: numpy's copies release the GIL, so they
    run in parallel (SD 1.x fp16 on 2 cores: 4.1-4.7 s with one thread, 2.4-3.2 s with two)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus))


def _ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """fn(item) for each item, in order, computed by `workers` threads at most 2 * workers items ahead of the
    consumer (so at most that many converted tensors wait to be placed)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ldm-jax-convert") as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:  # an error (or a consumer that stopped): drop the work not yet started
                future.cancel()


def state_dict_to_params(state_dict: Mapping[str, object], abstract_params: Mapping[str, Mapping], *,
                         ema: bool | None = None, dtype=np.float32, allow_unexpected: bool = False,
                         allow_nonfinite: bool = False, place=None, progress=None,
                         prefixes: Mapping[str, str] | None = None, workers: int | None = None,
                         text_layout: str | None = None):
    """Map a CompVis state dict onto the parameter trees whose shapes `abstract_params` gives.

    ema: use `model_ema.*` U-Net weights (None: if present). `place(array) -> array` puts each converted
    tensor where it should live (e.g. `jax.device_put`), in order on the calling thread, while `workers`
    threads (default `conversion_workers()`) convert the next few, so a few extra tensors are held at most.
    prefixes: per-component CompVis prefixes other than the standard ones ("" maps a single block).
    text_layout: "transformers", "open_clip" or "sgm" names for the text towers (`convert.keys.key_table`); None: as
    the state dict has it (`text_layout_of`). The Flax tree is the same either way.
    Returns ({component: tree}, MappingReport); a tensor holding several parameters (OpenCLIP's in_proj) is
    reported once.
    """
    state_dict = normalise_keys(state_dict)
    ema_present = has_ema(state_dict)
    if ema is None:
        ema = ema_present
    elif ema and not ema_present:
        raise CheckpointError("EMA weights were asked for (--ema / ema=True), but the checkpoint has no "
                              "model_ema.* weights")
    report = MappingReport(used_ema=bool(ema))
    used: set[str] = set()
    params: dict = {}
    prefixes = prefixes or {}
    text_layout = text_layout or text_layout_of(state_dict)
    entries = [e for c in abstract_params for e in key_table(c, abstract_params[c], prefixes.get(c), text_layout)]
    keys = [entry.ema_key if (ema and entry.ema_key) else entry.key for entry in entries]
    for entry, key in zip(entries, keys):  # before any work: a missing tensor fails at once
        if key not in state_dict:
            raise CheckpointError(f"missing tensor {key}" + (" (EMA copy of " + entry.key + ")" if key != entry.key
                                                            else ""))

    def convert(i: int):
        value = _convert_one(entries[i], keys[i], state_dict[keys[i]], dtype, allow_nonfinite)
        # converted: its file pages (this part's rows of a stacked tensor) need not stay in our resident set
        release_pages(take_part(entries[i], state_dict[keys[i]]))
        return value

    converted = _ordered_map(convert, range(len(entries)),
                             conversion_workers() if workers is None else workers)
    for entry, key, value in zip(entries, keys, converted):
        _set(params.setdefault(entry.component, {}), entry.flax_path, place(value) if place else value)
        if key not in used:
            used.add(key)
            report.mapped.append(key)
        if progress:
            progress(entry)
    model_keys = {e.key for e in entries}
    for key in state_dict:
        if key in used:
            continue
        reason = _ignore_reason(key)
        if reason is None and ema and key in model_keys:
            reason = "raw weights replaced by their EMA copy"
        elif reason is None and not ema and key.startswith("model_ema."):
            reason = "EMA weights not used (--no-ema)"
        if reason is None:
            report.unexpected.append(key)
        else:
            report.ignored[key] = reason
    if report.unexpected and not allow_unexpected:
        raise CheckpointError(f"{len(report.unexpected)} unexpected tensor(s), e.g. {report.unexpected[0]} "
                              "(to ignore them: `ldm-jax convert --allow-unexpected`, or allow_unexpected=True in "
                              "Python)")
    return params, report


def params_to_state_dict(params: Mapping[str, Mapping], dtype=None,
                         text_layout: str = "transformers") -> dict[str, np.ndarray]:
    """Flax parameter trees -> a CompVis-layout state dict (model weights only, canonical shapes).

    dtype: cast every tensor to it; a finite weight that does not fit (fp16: |w| > 65504 becomes Inf) is a
    CheckpointError naming the tensor and its max |value|, never a silent Inf.
    text_layout: the text towers' names, `convert.keys.layout_of(config)` ("open_clip" for SD 2.x, which stacks q, k,
    v into one in_proj tensor; "sgm" for SDXL, whose params with "text_encoder_2" are always written so)."""
    if "text_encoder_2" in params:  # only SDXL has it, and SDXL files have one layout
        text_layout = SGM
    out = {}
    stacked: dict[str, list] = {}
    for component, tree in params.items():
        for entry in key_table(component, tree, text_layout=text_layout):
            value = np.asarray(leaf_at(tree, entry.flax_path))
            value = to_compvis_layout(entry, value)
            if dtype is not None and np.dtype(dtype) != value.dtype:
                value = cast_checked(entry.key, value, dtype)
            if entry.parts == 1:
                out[entry.key] = np.ascontiguousarray(value)
                continue
            parts = stacked.setdefault(entry.key, [None] * entry.parts)
            parts[entry.part] = value
            if all(p is not None for p in parts):
                out[entry.key] = np.concatenate(stacked.pop(entry.key))
    if stacked:
        raise AssertionError(f"stacked tensors with missing parts: {', '.join(stacked)}")
    return out
