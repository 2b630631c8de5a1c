"""Optional pre-computation of the frozen encoders' outputs (`ldm-jax train --precompute-latents`).

Fine-tuning with a frozen autoencoder and text encoder recomputes the same VAE encoding and text embedding of every
image in every epoch; caching them once (the "cache latents" option of many SD trainers) removes the encoders from
the train step. What is cached is the autoencoder's posterior *moments* (mean, logvar), not a sample, so the train
step still draws a fresh z_0 ~ q(z|x) per example from the step's keys (`loss.posterior_sample`): with or without the
cache the objective is the same (Rombach et al. 2022 eq. 2; diffusers' `train_text_to_image_flax.py` encodes on the
fly). With `--random-flip` the mirrored image's moments are cached as well.

Files in the cache directory (float32 `.npy`, memory-mapped when read): `moments.npy` [n, F, h, w, 2C] (F = 2 with
flips, else 1), `ctx.npy` [n, S, d] (not when the text encoder trains: `text=False`), SDXL's `pooled.npy` [n, P]
(the second text encoder's pooled output), `sizes.npy` int32 [n, F, 4] (original height, width, crop top, left of
each view: SDXL's size and crop conditioning, `data.Example`), `ok.npy` bool [n] (False: unreadable image) and
`fingerprint.json`: the dataset (paths, sizes, mtimes, captions), resolution, flip, buckets, model
config, base weights and compute dtype; a cache with another fingerprint is rebuilt. With aspect-ratio buckets
(`buckets.py`) each image's moments have its bucket's shape: `moments.npy` is then flat, image i's F views starting at
`offsets.npy` [n] int64, each of shape `shapes.npy` [n, 3] (h, w, 2C). Files are written under
temporary names and renamed. Batches come from the same `data.BatchIterator` order (seed, epoch permutations, flip
decisions, replacement of unreadable images), so positions and resume work exactly as without the cache. Every
process builds (or reads) the cache on its own local device.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.errors import UserError
from ldm_jax.train import buckets as B
from ldm_jax.train import data as D
from ldm_jax.train.example import mirrored_left, read_example

BATCH = 8


def fingerprint(sd, dataset: D.Dataset, resolution: int, random_flip: bool, dtype, text: bool = True,
                buckets: B.BucketPlan | None = None) -> str:
    h = hashlib.sha256()
    for path, caption in zip(dataset.paths, dataset.captions):
        st = os.stat(path)
        h.update(json.dumps([path, caption, st.st_size, st.st_mtime_ns]).encode())
    encoders = ("vae", "text_encoder", "text_encoder_2")[:1 + 2 * text]
    leaves = jax.tree_util.tree_leaves({c: sd.params[c] for c in encoders if c in sd.params})
    probe = [float(np.asarray(x).reshape(-1)[:4].astype(np.float64).sum()) for x in leaves[:64]]
    h.update(json.dumps([resolution, random_flip, jnp.dtype(dtype).name, sd.config.to_dict(), probe,
                         sd.metadata.get("source"), text, "sizes"], default=str).encode())
    if buckets is not None:
        h.update(json.dumps([buckets.sizes, buckets.of_image.tolist()]).encode())
    return h.hexdigest()


def build(sd, dataset: D.Dataset, resolution: int, random_flip: bool, cache_dir: str, dtype=jnp.float32,
          log=print, text: bool = True, buckets: B.BucketPlan | None = None) -> dict:
    """Encode every image (and its mirror with random_flip) and, with `text`, its caption once; returns the
    memory-mapped arrays. With `buckets`, each image is cropped to its bucket."""
    fp = fingerprint(sd, dataset, resolution, random_flip, dtype, text, buckets)
    meta_file = os.path.join(cache_dir, "fingerprint.json")
    try:
        with open(meta_file, encoding="utf-8") as f:
            if json.load(f).get("fingerprint") == fp:
                return _open(cache_dir)
    except (OSError, ValueError):
        pass
    os.makedirs(cache_dir, exist_ok=True)
    enc = sd.replace(dtype=dtype)
    encode = jax.jit(lambda p, x: enc.encode_moments(p, x))
    pooled = sd.config.is_sdxl
    encode_text = jax.jit(lambda p, ids: enc.encode_text(p, ids, pooled=pooled))
    n, flips = len(dataset), 2 if random_flip else 1
    log(f"pre-computing latents{' and text embeddings' if text else ''} of {n} images into {cache_dir} ...")
    crops = [(resolution, resolution)] * n if buckets is None else [buckets.sizes[b] for b in buckets.of_image]
    flat = _flat_layout(sd, crops, flips) if buckets is not None else None  # (offsets, shapes, total)
    arrays, ok = {}, np.zeros(n, bool)
    sizes = np.zeros((n, flips, 4), np.int32)
    for crop in sorted(set(crops)):
        same = [i for i in range(n) if crops[i] == crop]
        for start in range(0, len(same), BATCH):
            idx = same[start:start + BATCH]
            x = np.stack([_read(dataset.paths[i], crop, i, sizes, ok, flips) for i in idx])
            views = [x, x[:, :, ::-1]] if random_flip else [x]
            moments = np.stack([np.asarray(encode(sd.params, np.ascontiguousarray(v))) for v in views], axis=1)
            outputs = []
            if text:
                encoded = encode_text(sd.params, sd.tokenize([dataset.captions[i] for i in idx]))
                names = ("ctx", "pooled") if pooled else ("ctx",)
                outputs += [(name, np.asarray(a)) for name, a in zip(names, encoded if pooled else (encoded,))]
            if flat is None:
                outputs.append(("moments", moments))
            else:
                if "moments" not in arrays:
                    arrays["moments"] = _memmap(cache_dir, "moments", (flat[2],))
                for row, i in zip(moments, idx):
                    arrays["moments"][flat[0][i]:flat[0][i] + row.size] = row.reshape(-1)
            for name, value in outputs:
                if name not in arrays:
                    arrays[name] = _memmap(cache_dir, name, (n,) + value.shape[1:])
                arrays[name][idx] = value
    if not ok.any():
        raise UserError(f"no readable image in {dataset.root}")
    stale = ("ctx", "pooled", "offsets", "shapes")  # from an earlier cache of this directory
    for name in stale:
        if name not in arrays and os.path.exists(os.path.join(cache_dir, f"{name}.npy")):
            os.remove(os.path.join(cache_dir, f"{name}.npy"))
    for name, a in arrays.items():
        a.flush()
        del a
        os.replace(os.path.join(cache_dir, f".{name}.tmp.npy"), os.path.join(cache_dir, f"{name}.npy"))
    small = [("sizes", sizes), ("ok", ok)] + ([] if flat is None else [("offsets", flat[0]), ("shapes", flat[1])])
    for name, a in small:
        np.save(os.path.join(cache_dir, f".{name}.tmp.npy"), a)
        os.replace(os.path.join(cache_dir, f".{name}.tmp.npy"), os.path.join(cache_dir, f"{name}.npy"))
    with open(meta_file + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"fingerprint": fp, "n": n, "flips": flips, "resolution": resolution}, f)
    os.replace(meta_file + ".tmp", meta_file)
    return _open(cache_dir)


def _memmap(cache_dir: str, name: str, shape):
    return np.lib.format.open_memmap(os.path.join(cache_dir, f".{name}.tmp.npy"), "w+", np.float32, shape)


def _read(path, crop, i, sizes, ok, flips) -> np.ndarray:
    """Image i's pixels cropped to `crop` (width, height), recording its size numbers and readability; zeros if
    unreadable (`ok[i]` stays False)."""
    try:
        ex = read_example(path, crop, True, False, None)  # upscaling: counted by the loader
    except D.UnreadableImage:
        return np.zeros((crop[1], crop[0], 3), np.float32)
    (w, h), (top, left) = ex.original_size, ex.crop_top_left
    flipped_left = mirrored_left(left, ex.resized_size[0], crop[0])
    sizes[i] = [(h, w, top, left), (h, w, top, flipped_left)][:flips]
    ok[i] = True
    return ex.pixels


def _flat_layout(sd, crops, flips):
    """(offsets int64 [n], shapes int64 [n, 3], total floats) of the flat moments file: each image's F views of its
    bucket's latent shape (h, w, 2C)."""
    shapes = {}
    for crop in set(crops):
        x = jax.ShapeDtypeStruct((1, crop[1], crop[0], 3), jnp.float32)
        shapes[crop] = jax.eval_shape(sd.encode_moments, sd.params, x).shape[1:]
    per_image = np.array([flips * int(np.prod(shapes[c])) for c in crops], np.int64)
    offsets = np.concatenate([[0], np.cumsum(per_image)[:-1]]).astype(np.int64)
    return offsets, np.array([shapes[c] for c in crops], np.int64), int(per_image.sum())


def _open(cache_dir: str) -> dict:
    names = ("moments", "ctx", "pooled", "sizes", "ok", "offsets", "shapes")
    files = {name: os.path.join(cache_dir, f"{name}.npy") for name in names}
    small = ("ok", "offsets", "shapes")
    return {name: np.load(f, mmap_mode=None if name in small else "r") for name, f in files.items()
            if os.path.exists(f)}


class CachedBatchIterator(D.BatchIterator):
    """`data.BatchIterator` whose rows are cached (moments, ctx) instead of decoded images: same order, same flips,
    same replacement of unreadable images, same positions. Yields {"moments", "ctx" and "pooled" (if cached),
    "captions", "indices", "original_sizes", "crop_top_left"}."""

    def __init__(self, cache: dict, dataset: D.Dataset, **kw):
        super().__init__(dataset, **{**kw, "center_crop": True})  # the cache holds the centre crops
        self.cache = cache

    def _load_row(self, epoch: int, offset: int, index: int):
        failures = []
        for attempt in range(D.MAX_REPLACEMENT_TRIES + 1):
            if attempt:  # as BatchIterator._load_row
                index = self._replacement(epoch, offset, attempt, index)
            if self.cache["ok"][index]:
                rng = np.random.default_rng([self.seed, epoch, index])  # the flip decision of example.read_example
                flip = int(self.random_flip and rng.random() < 0.5)
                parts = [self._moments(index, flip)]
                parts += [self.cache[name][index] for name in ("ctx", "pooled") if name in self.cache]
                row = np.concatenate([np.asarray(a).reshape(-1) for a in parts])
                h, w, top, left = (int(v) for v in self.cache["sizes"][index, flip])
                return row, index, (w, h), (top, left), failures, self._caption(epoch, index)
            failures.append((index, f"{self.dataset.paths[index]}: unreadable"))
        raise UserError(f"no readable image found in {D.MAX_REPLACEMENT_TRIES} tries")

    def _moments(self, index: int, flip: int) -> np.ndarray:
        """Image `index`'s cached moments of view `flip`: [h, w, 2C]."""
        if "offsets" not in self.cache:
            return self.cache["moments"][index, flip]
        shape = tuple(self.cache["shapes"][index])
        start = int(self.cache["offsets"][index]) + flip * int(np.prod(shape))
        return self.cache["moments"][start:start + int(np.prod(shape))].reshape(shape)

    def __next__(self) -> dict:
        out = super().__next__()
        rows = out.pop("images")  # [B, moments + ctx + pooled]: one flat float32 row per sample, split here
        start = 0
        for name in ("moments", "ctx", "pooled"):
            if name in self.cache:
                if name == "moments" and "offsets" in self.cache:  # buckets: every row has this batch's bucket
                    shape = tuple(self.cache["shapes"][out["indices"][0]])
                else:
                    shape = self.cache[name].shape[1 + (name == "moments"):]
                size = int(np.prod(shape))
                out[name] = rows[:, start:start + size].reshape((-1,) + shape)
                start += size
        return out


def cached_batches(cache: dict, dataset: D.Dataset, **kw) -> CachedBatchIterator:
    return CachedBatchIterator(cache, dataset, **kw)
