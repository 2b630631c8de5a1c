"""Parameter shapes on disk, in the compilation cache's directory, so that a new process skips tracing three model
inits (`build.abstract_params`: ~1.8 s at SD 1.x size on 2 cores, the largest start-up cost after imports).

The key hashes the config, the components, Flax's version and the source of every file in ldm_jax/models and of
configs.py, so an edit to a model (or a Flax upgrade) can never be answered with stale shapes.
LDM_JAX_NO_COMPILE_CACHE=1 turns it off together with the compilation cache; an unwritable directory just means
no cache.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import threading

import flax
import jax
import numpy as np

from ldm_jax.compile_cache import cache_dir


def _path(config_json: str, components: tuple[str, ...]) -> str | None:
    if os.environ.get("LDM_JAX_NO_COMPILE_CACHE") == "1":
        return None
    h = hashlib.sha256(json.dumps([config_json, list(components), flax.__version__]).encode())
    here = os.path.dirname(__file__)
    for f in sorted(glob.glob(os.path.join(here, "*.py"))) + [os.path.join(os.path.dirname(here), "configs.py")]:
        with open(f, "rb") as fh:
            h.update(fh.read())
    return os.path.join(cache_dir(), "shapes", h.hexdigest()[:40] + ".json")


def _encode(tree):
    if isinstance(tree, dict):
        return {k: _encode(v) for k, v in tree.items()}
    return [list(tree.shape), np.dtype(tree.dtype).name]


def _decode(tree):
    if isinstance(tree, dict):
        return {k: _decode(v) for k, v in tree.items()}
    return jax.ShapeDtypeStruct(tuple(tree[0]), np.dtype(tree[1]))


def cached_shapes(config_json: str, components: tuple[str, ...], compute):
    """compute() -> {component: params of ShapeDtypeStruct}, read from disk when an entry exists (and its
    checksum matches: a damaged entry that still parsed made every load fail on a wrong shape), else computed
    and written (temporary file, then rename)."""
    path = _path(config_json, components)
    if path is not None and os.path.exists(path):
        try:
            with open(path) as f:
                entry = json.load(f)
            if entry["sha256"] == _digest(entry["shapes"]):
                return _decode(entry["shapes"])
        except (OSError, ValueError, TypeError, IndexError, KeyError):
            pass  # unreadable, damaged or an older format: recompute and overwrite
    shapes = compute()
    if path is not None:
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"  # unique per process and thread
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            encoded = _encode(shapes)
            with open(tmp, "w") as f:
                json.dump({"sha256": _digest(encoded), "shapes": encoded}, f)
            os.replace(tmp, path)
        except OSError:
            _remove(tmp)
        except BaseException:  # Ctrl-C: no temporary file left behind
            _remove(tmp)
            raise
    return shapes


def _digest(encoded) -> str:
    return hashlib.sha256(json.dumps(encoded, sort_keys=True).encode()).hexdigest()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
