"""The on-disk parameter-shape cache behind `abstract_params`: a second process reads what the first computed,
the key follows the config, and a corrupt entry or LDM_JAX_NO_COMPILE_CACHE=1 falls back to computing."""

import glob
import os

import jax
import jax.numpy as jnp

from ldm_jax.configs import preset
from ldm_jax.models import shape_cache
from ldm_jax.models.build import abstract_params


def _compute_counter(tree):
    calls = []

    def compute():
        calls.append(1)
        return tree

    return compute, calls


def test_entries_round_trip_and_follow_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_JAX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LDM_JAX_NO_COMPILE_CACHE", raising=False)
    tree = abstract_params(preset("tiny"))  # the real thing: nested dicts of ShapeDtypeStruct
    compute, calls = _compute_counter(tree)
    key = preset("tiny").to_json()
    entries = lambda: len(glob.glob(str(tmp_path / "shapes" / "*.json")))  # noqa: E731
    before = entries()  # abstract_params may have written its own entry just now
    first = shape_cache.cached_shapes(key, ("unet", "vae"), compute)
    again = shape_cache.cached_shapes(key, ("unet", "vae"), compute)
    assert len(calls) == 1 and first is tree
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(tree)
    assert [(a.shape, a.dtype) for a in jax.tree_util.tree_leaves(again)] == \
        [(a.shape, a.dtype) for a in jax.tree_util.tree_leaves(tree)]
    shape_cache.cached_shapes(preset("shapes").to_json(), ("unet", "vae"), compute)  # another config: computed
    assert len(calls) == 2 and entries() == before + 2


def test_corrupt_entry_and_disabled_cache_recompute(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_JAX_CACHE_DIR", str(tmp_path))
    tree = {"unet": {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)}}
    compute, calls = _compute_counter(tree)
    shape_cache.cached_shapes("cfg", ("unet",), compute)
    (entry,) = glob.glob(str(tmp_path / "shapes" / "*.json"))
    with open(entry, "w") as f:
        f.write("{not json")
    assert shape_cache.cached_shapes("cfg", ("unet",), compute)["unet"]["w"].shape == (2, 3)
    assert len(calls) == 2
    with open(entry) as f:  # valid JSON with one number changed: the checksum refuses it (it made every load fail)
        text = f.read()
    assert "[2, 3]" in text
    with open(entry, "w") as f:
        f.write(text.replace("[2, 3]", "[2, 4]"))
    assert shape_cache.cached_shapes("cfg", ("unet",), compute)["unet"]["w"].shape == (2, 3)
    assert len(calls) == 3
    monkeypatch.setenv("LDM_JAX_NO_COMPILE_CACHE", "1")
    os.remove(entry)
    shape_cache.cached_shapes("cfg", ("unet",), compute)
    assert len(calls) == 4 and not os.path.exists(entry)
