"""How fast a model's weights reach the device, for issue 6's first-image target, in one device call: with the
program read from the program cache, the weights (4.3 GB of fp32 for SD 1.x; 3.3 s of zeros on the H200 host)
are the longer half of a new process's start. Each way is timed on the same host arrays (filled, so every page
is real; their preparation is not timed), twice, from a fresh device copy each time:

- fp32_tree:          `jax.device_put` of the fp32 parameter tree, as `ldm_jax.load` places converted tensors
- fp32_tree_threads:  the same, one leaf per call from `conversion_workers()` threads
- fp16_tree_upcast:   the fp16 tree (half the bytes, as an fp16 checkpoint stores them), then one jitted
                      upcast of the whole tree on the device (its compile is reported apart, as it would be
                      cached)

One flat buffer split on the device by one program was tried and dropped: splitting SD 1.x's 1130 tensors
compiled for 10-12 s on 2 CPU cores.

    PYTHONPATH=. python scripts/gpu_transfer.py --out $OUT/transfer.json          # on the GPU machine
    PYTHONPATH=. python scripts/gpu_transfer.py --out t.json --preset tiny        # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor


def _timed(fn, reps: int) -> list[float]:
    import jax

    out = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(round(time.perf_counter() - t, 3))
    return out


def measure(preset_name: str, reps: int = 3) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from convert.mapping import conversion_workers
    from ldm_jax.bench import device_name
    from ldm_jax.configs import preset
    from ldm_jax.models.build import abstract_params

    shapes = jax.tree_util.tree_leaves(abstract_params(preset(preset_name)))
    sizes = [int(np.prod(s.shape)) for s in shapes]
    offsets = np.cumsum([0] + sizes)
    t = time.perf_counter()
    flat = {np.float32: np.full(offsets[-1], 0.01, np.float32), np.float16: np.full(offsets[-1], 0.01, np.float16)}
    leaves = {dt: [flat[dt][a:b].reshape(s.shape) for s, a, b in zip(shapes, offsets[:-1], offsets[1:])]
              for dt in flat}
    res = {"device": device_name(), "preset": preset_name, "leaves": len(shapes),
           "fp32_gb": round(flat[np.float32].nbytes / 1e9, 3), "host_prepare_s": round(time.perf_counter() - t, 2),
           "workers": conversion_workers(), "seconds": {}}

    t = time.perf_counter()  # one program for the whole tree, as a loader would have it cached
    upcast = jax.jit(lambda xs: [x.astype(jnp.float32) for x in xs]).lower(
        [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves[np.float16]]).compile()
    res["upcast_compile_s"] = round(time.perf_counter() - t, 2)

    def threads():
        with ThreadPoolExecutor(conversion_workers()) as pool:
            return list(pool.map(jax.device_put, leaves[np.float32]))

    ways = {
        "fp32_tree": lambda: jax.device_put(leaves[np.float32]),
        "fp32_tree_threads": threads,
        "fp16_tree_upcast": lambda: upcast(jax.device_put(leaves[np.float16])),
    }
    for name, fn in ways.items():
        res["seconds"][name] = _timed(fn, reps)
        print(name, res["seconds"][name], flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file")
    ap.add_argument("--preset", default="sd1")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    res = measure(a.preset, a.reps)
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
