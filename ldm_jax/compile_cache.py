"""JAX's persistent compilation cache, on by default in a user cache directory.

A new process reuses compiled programs (U-Net loops, decoders) from disk instead of recompiling them.
LDM_JAX_CACHE_DIR overrides the location; LDM_JAX_NO_COMPILE_CACHE=1 turns it off.
"""

from __future__ import annotations

import os

import jax

_enabled = False


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.environ.get("LDM_JAX_CACHE_DIR") or os.path.join(base, "ldm-jax", "xla")
    return os.path.abspath(os.path.expanduser(path))  # "~/x" as a shell would; relative to where it started


def enable_compilation_cache() -> str | None:
    """Turn the persistent cache on (once per process) unless disabled or already configured by the user."""
    global _enabled
    if _enabled or os.environ.get("LDM_JAX_NO_COMPILE_CACHE") == "1":
        return None
    if jax.config.jax_compilation_cache_dir:  # the user set their own
        _enabled = True
        return jax.config.jax_compilation_cache_dir
    path = cache_dir()
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None  # read-only home etc.: run without the cache
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _enabled = True
    return path
