"""The directory written by `ldm-jax convert` and read by `ldm_jax.load(directory)`.

Layout (`FORMAT`, version `FORMAT_VERSION`)::

    OUT_DIR/config.json     ModelConfig.to_json(): the architecture
    OUT_DIR/metadata.json   {"format", "format_version", "source", "source_sha256", "kind", "ema", "dtype",
                             "ldm_jax_version", "report": {"mapped", "ignored", "unexpected"}, ...}
    OUT_DIR/params/         an orbax PyTree checkpoint (OCDBT, uncompressed) of {"unet", "vae", "text_encoder"}
                            (SDXL: and "text_encoder_2"), every leaf stored in the dtype named by metadata["dtype"]

Writing is atomic: everything is built in a temporary sibling directory `<OUT_DIR>.tmp-<random>` that is renamed
to OUT_DIR only when complete; on any failure (exception, Ctrl-C) the temporary directory is removed, so OUT_DIR
is either absent, untouched, or complete. Orbax saves on a worker thread that a Ctrl-C does not stop: the main
thread waits for it (and for orbax's writer threads it waits on) before removing the temporary directory, so no
writer re-creates it afterwards; a second Ctrl-C stops waiting. An existing non-empty OUT_DIR is refused unless
`overwrite=True` and it is itself a converted directory (never an arbitrary directory of user files, never a
symbolic link); it is then renamed aside, the new directory renamed in, and the old one deleted.

Memory and speed: orbax copies numpy leaves before writing them but writes `jax.Array` leaves in place, so the
converter hands it jax arrays on the CPU. Restoring reads the tree's shapes from the orbax metadata (no model
tracing) and lets tensorstore read, cast and place every tensor directly on the default device.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import secrets
import shutil
import sys
import threading

import jax
import numpy as np

from convert.errors import CheckpointError
from ldm_jax.configs import ModelConfig

FORMAT = "ldm-jax-converted"
FORMAT_VERSION = 1
CONFIG_FILE, METADATA_FILE, PARAMS_DIR = "config.json", "metadata.json", "params"
PARAMS_FILES = "params_files"  # metadata entry: {file under params/: size}, checked before reading


def is_converted_dir(path: str | os.PathLike) -> bool:
    """True if `path` looks like a directory written by `write_converted` (marker files present)."""
    path = os.fspath(path)
    if not all(os.path.isfile(os.path.join(path, f)) for f in (CONFIG_FILE, METADATA_FILE)):
        return False
    if not os.path.isdir(os.path.join(path, PARAMS_DIR)):
        return False
    try:
        with open(os.path.join(path, METADATA_FILE), encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse (before any work) an empty path, a symbolic link, a file, a non-empty directory without `overwrite`,
    and, even with `overwrite`, a non-empty directory that is not a converted directory (it may hold user files)."""
    out_dir = os.fspath(out_dir)
    if not out_dir:
        raise CheckpointError("the output directory path is empty")
    if os.path.islink(out_dir):
        raise CheckpointError(f"{out_dir}: is a symbolic link; give the directory itself (or a new path)")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointError(f"{out_dir}: exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise CheckpointError(f"{out_dir}: directory exists and is not empty (pass --overwrite to replace it)")
        if not is_converted_dir(out_dir):
            raise CheckpointError(f"{out_dir}: not an ldm-jax converted directory; refusing to replace it (and the "
                                  "files in it): remove it yourself or choose another OUT_DIR")
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise CheckpointError(f"{out_dir}: parent directory {parent} does not exist")


# --------------------------------------------------------------------------------------------------- writing


def _checkpointer():
    """Uncompressed (real weights barely compress; zstd costs seconds per GB). Pinned-host staging is off: orbax
    turns it on when the default backend is a GPU and then copies every (CPU) array once more before writing."""
    import inspect

    import orbax.checkpoint as ocp

    options = {"use_compression": False, "enable_pinned_host_transfer": False}
    accepted = inspect.signature(ocp.PyTreeCheckpointHandler).parameters
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**{k: v for k, v in options.items() if k in accepted}))


def _write_json(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text if text.endswith("\n") else text + "\n")
        f.flush()
        os.fsync(f.fileno())


def _remove_tree(path: str) -> None:
    for _ in range(3):  # orbax's writer threads may still be finishing a file after an interrupt
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            return


def finish_despite_interrupt(fn, *args):
    """fn(*args) on a worker thread; the calling thread waits for it to return even through a Ctrl-C (the
    KeyboardInterrupt is re-raised once it has), so nothing is still writing when the caller cleans up. A second
    Ctrl-C stops waiting. (An Event, not Thread.join: an interrupted join marks a live thread as stopped.)"""
    outcome: dict = {}
    done = threading.Event()

    def target():
        try:
            outcome["value"] = fn(*args)
        except BaseException as e:  # handed to the waiting thread
            outcome["error"] = e
        finally:
            done.set()

    threading.Thread(target=target, name=f"ldm-jax-{fn.__name__}", daemon=True).start()
    interrupted = None
    while not done.is_set():
        try:
            done.wait(0.05)
        except KeyboardInterrupt as e:
            if interrupted is not None:
                raise
            interrupted = e
    if interrupted is not None:
        raise interrupted
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _save_params(params_dir: str, tree) -> None:
    """One synchronous orbax save of `tree` to `params_dir` (the checkpointer closed when it returns)."""
    import orbax.checkpoint as ocp

    with _checkpointer() as ckptr:
        ckptr.save(params_dir, args=ocp.args.PyTreeSave(tree))


@contextlib.contextmanager
def staging_dir(out_dir: str):
    """A fresh temporary sibling of `out_dir`, removed again if the block raises (anything, Ctrl-C included)."""
    parent, base = os.path.split(os.path.abspath(out_dir))
    tmp = os.path.join(parent, f"{base}.tmp-{secrets.token_hex(4)}")
    try:
        os.mkdir(tmp)
    except OSError as e:
        raise CheckpointError(f"{out_dir}: cannot create a temporary directory in {parent}: {e.strerror}") from e
    try:
        yield tmp
    except BaseException:
        _remove_tree(tmp)
        raise


def install_dir(tmp: str, out_dir: str, overwrite: bool) -> None:
    """Rename the complete `tmp` to `out_dir`; an existing `out_dir` is renamed aside first and then deleted."""
    check_output_dir(out_dir, overwrite)
    if not os.path.isdir(out_dir):
        os.rename(tmp, out_dir)
        return
    aside = f"{os.path.abspath(out_dir)}.old-{secrets.token_hex(4)}"
    os.rename(out_dir, aside)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(aside, out_dir)
        raise
    _remove_tree(aside)


def write_converted(out_dir: str | os.PathLike, config: ModelConfig, params, metadata: dict, *,
                    overwrite: bool = False) -> None:
    """Write config, metadata and params ({"unet", "vae", "text_encoder"} trees; SDXL: and "text_encoder_2") to
    `out_dir`, atomically.

    Pass `jax.Array` leaves to avoid a copy (orbax copies numpy leaves). `metadata` must be JSON-serialisable;
    `format`, `format_version` and `dtype` (the leaves' dtype) are filled in here.
    """
    out_dir = os.fspath(out_dir)
    from ldm_jax.models.build import components_of

    components = components_of(config)
    missing = [c for c in components if c not in params]
    if missing:
        raise CheckpointError(f"{out_dir}: params lack the component(s) {', '.join(missing)}")
    dtypes = {np.dtype(leaf.dtype).name for leaf in jax.tree_util.tree_leaves(params)}
    if len(dtypes) != 1:
        raise CheckpointError(f"{out_dir}: params mix dtypes {sorted(dtypes)}; convert them to one dtype")
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, **metadata, "dtype": dtypes.pop()}
    check_output_dir(out_dir, overwrite)
    with staging_dir(out_dir) as tmp:
        _write_json(os.path.join(tmp, CONFIG_FILE), config.to_json())
        finish_despite_interrupt(_save_params, os.path.join(tmp, PARAMS_DIR), {c: params[c] for c in components})
        metadata[PARAMS_FILES] = _file_sizes(os.path.join(tmp, PARAMS_DIR))
        _write_json(os.path.join(tmp, METADATA_FILE), json.dumps(metadata, indent=2, sort_keys=True))
        finish_despite_interrupt(install_dir, tmp, out_dir, overwrite)


def _file_sizes(folder: str) -> dict[str, int]:
    """{path relative to `folder` (with /): size in bytes} of every file under `folder`."""
    sizes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            full = os.path.join(root, name)
            sizes[os.path.relpath(full, folder).replace(os.sep, "/")] = os.path.getsize(full)
    return sizes


def _check_files(path: str, metadata: dict) -> None:
    """A missing or resized file under params/ (against the sizes `write_converted` recorded; directories written
    before it recorded them are not checked) is a one-line error before orbax reads anything: orbax's own
    failure on such a file comes with tracebacks printed from its reader threads."""
    for rel, size in sorted(metadata.get(PARAMS_FILES, {}).items()):
        full = os.path.join(path, PARAMS_DIR, *rel.split("/"))
        found = os.path.getsize(full) if os.path.isfile(full) else None
        if found != size:
            what = "is missing" if found is None else f"has {found} bytes, {size} were written"
            raise CheckpointError(f"{path}: damaged converted directory: {PARAMS_DIR}/{rel} {what}; convert the "
                                  "source file again")


# --------------------------------------------------------------------------------------------------- reading


def read_info(path: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """(config, metadata) of a converted directory; CheckpointError if `path` is not one."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    if not is_converted_dir(path):
        from convert.file_kinds import describe_directory

        kind = describe_directory(path)  # a diffusers pipeline or component folder: say so
        if kind:
            raise CheckpointError(f"{path}: {kind}")
        raise CheckpointError(f"{path}: not an ldm-jax converted checkpoint directory (expected {CONFIG_FILE}, "
                              f"{METADATA_FILE} and {PARAMS_DIR}/ written by `ldm-jax convert`)")
    try:
        with open(os.path.join(path, METADATA_FILE), encoding="utf-8") as f:
            metadata = json.load(f)
        with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
            config = ModelConfig.from_json(f.read())
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: damaged {CONFIG_FILE} or {METADATA_FILE}: {type(e).__name__}: {e}") from e
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer ldm-jax (format version {metadata['format_version']}); "
                              "upgrade ldm-jax")
    return config, metadata


def _check_ema(path: str, metadata: dict, ema: bool | None) -> None:
    used = bool(metadata.get("ema"))
    if ema is None or ema == used:
        return
    how = "with EMA weights (--ema)" if used else (
        "from the raw weights (--no-ema)" if metadata.get("ema_available") else "from a checkpoint without EMA weights")
    want = "EMA" if ema else "raw (non-EMA)"
    raise CheckpointError(f"{path}: asked for the {want} U-Net, but this directory holds only one U-Net, converted "
                          f"{how}; re-convert the source file with {'--ema' if ema else '--no-ema'}")


def _stored_tree(params_dir: str):
    """The saved tree of ArrayMetadata (shape, dtype) from orbax's own metadata file."""
    import orbax.checkpoint as ocp
    from etils import epath

    meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(params_dir))
    return getattr(meta, "tree", meta)  # orbax >= 0.11 wraps the tree


def _collect_quietly() -> None:
    """Collect the read coroutines a failed orbax restore abandoned. Orbax's `_read_array_index_and_device_put`
    turns the GeneratorExit of its own finalisation into an `Exception`, which Python would print (a spec dump of
    ~60 lines per tensor) as "Exception ignored in" whenever the garbage collector gets to it; those are dropped."""
    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        if "orbax" not in getattr(code, "co_filename", ""):
            previous(unraisable)

    previous, sys.unraisablehook = sys.unraisablehook, hook
    try:
        gc.collect()
    finally:
        sys.unraisablehook = previous


def _first_line(error: BaseException) -> str:
    """The root cause of an orbax/tensorstore error as one line, without tensorstore's multi-line spec dump."""
    seen = {id(error)}
    while (error.__cause__ or error.__context__) is not None and id(error.__cause__ or error.__context__) not in seen:
        error = error.__cause__ or error.__context__
        seen.add(id(error))
    text = (str(error).strip().splitlines() or [""])[0]
    for cut in (" [tensorstore_spec", " See full TensorStore details"):
        text = text.split(cut)[0]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _restore(params_dir: str, target_dtype: np.dtype) -> dict:
    """The orbax parameter tree of `params_dir`, cast to target_dtype on the default device."""
    import orbax.checkpoint as ocp

    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    stored = _stored_tree(params_dir)
    is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), target_dtype, sharding=sharding), stored, is_leaf=is_leaf)
    restore_args = jax.tree_util.tree_map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding, dtype=target_dtype),
                                          target)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        return ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(target, restore_args=restore_args))


def read_converted(path: str | os.PathLike, ema: bool | None = None, param_dtype="float32", dtype="float32",
                   attention_impl: str = "auto"):
    """A converted directory -> StableDiffusion, params cast to `param_dtype` on the default device.

    ema: None takes the U-Net the directory holds; True/False must match how it was converted (a directory holds
    only one U-Net), otherwise a CheckpointError says how it was converted.
    """
    from ldm_jax.stable_diffusion import StableDiffusion, as_dtype

    path = os.fspath(path)
    config, metadata = read_info(path)
    _check_ema(path, metadata, ema)
    _check_files(path, metadata)
    target_dtype = np.dtype(as_dtype(param_dtype))
    params_dir = os.path.abspath(os.path.join(path, PARAMS_DIR))
    failure = None
    try:  # a Ctrl-C waits for orbax's reader threads, which otherwise print "Event loop is closed" tracebacks
        params = finish_despite_interrupt(_restore, params_dir, target_dtype)
    except MemoryError:
        raise
    except Exception as e:  # orbax raises bare Exception (and ValueError, KeyError, ...) for damaged files
        failure = _first_line(e)
    if failure is not None:  # outside the except block: the orbax error and its frames are gone now
        _collect_quietly()
        raise CheckpointError(f"{path}: damaged converted directory: cannot restore its orbax parameters "
                              f"({failure}); convert the source file again")
    from ldm_jax.models.build import components_of

    if set(params) != set(components_of(config)):
        raise CheckpointError(f"{path}: parameters hold {sorted(params)}, expected {list(components_of(config))}")
    return StableDiffusion(config, dict(params), dtype=dtype, attention_impl=attention_impl,
                           metadata={**metadata, "path": path})
