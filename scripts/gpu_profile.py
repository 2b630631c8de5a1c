"""Where the time goes, for issue 6, in one device call: (1) a new process's first image, cold then warm cache,
phase by phase (the CLI's path: weights loading while the program compiles), with JAX's compile and cache-hit
log of the warm run; (2) kernel-time breakdowns of the U-Net step (bf16, CFG) called alone, with its optimized HLO,
and (3) of whole txt2img programs per sampling step, from jax.profiler traces, summed by kernel name, by kind
(convolution, attention, GEMM, elementwise, ...) and by HLO op.

    PYTHONPATH=. python scripts/gpu_profile.py --out $OUT/profile.json            # on the GPU machine
    PYTHONPATH=. python scripts/gpu_profile.py --out p.json --preset tiny --size 64 --steps 2 --images 1,2 \
        --loop-images 1
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
import time

def first_image(preset: str, size: int, steps: int, cache: str, log_compiles: bool) -> dict:
    """A new process's first image (`bench.first_image_process`, bf16): its phases, and with `log_compiles`
    JAX's log of every compile and persistent-cache lookup."""
    from ldm_jax.bench import first_image_process

    env = {"JAX_LOG_COMPILES": "1", "JAX_EXPLAIN_CACHE_MISSES": "1"} if log_compiles else None
    t0 = time.perf_counter()
    seconds, phases, p = first_image_process(preset, "bfloat16", size, steps, cache, env)
    res = {"wall_s": round(time.perf_counter() - t0, 2), "to_image_s": seconds and round(seconds, 2),
           "phases_s": phases}
    if p.returncode != 0:
        res["error"] = (p.stderr.strip().splitlines() or ["?"])[-1][-400:]
    if log_compiles:  # one line per compile / cache event, long keys cut
        keep = ("cache hit", "CACHE MISS", "Finished XLA compilation", "Finished tracing", "Compiling",
                "Not writing", "Writing")
        lines = [ln[:240] for ln in p.stderr.splitlines() if any(k in ln for k in keep)]
        res["n_xla_compiles"] = sum("Finished XLA compilation" in ln for ln in lines)
        res["log"] = lines[-40:]
    return res


def _kind(name: str) -> str:
    """Kernel kind from its name (cuDNN's attention kernels say "sdpa ... fprop", its convolutions "fprop")."""
    n = name.lower()
    for kind, keys in (("attention", ("sdpa", "fmha", "flash")),
                       ("conv", ("fprop", "conv", "dgrad", "wgrad")),
                       ("gemm", ("nvjet", "gemm", "matmul", "cublas", "cutlass")),
                       ("transpose/copy", ("transpose", "copy", "memcpy", "memset", "concatenate", "dynamic")),
                       ("reduce (norms)", ("reduce",))):
        if any(k in n for k in keys):
            return kind
    return "elementwise fusion/other"


def _trace_summary(trace_dir: str, per: int) -> dict:
    """Kernel time from the profiler's trace.json.gz, per unit (`per` units traced): by kernel name, by kind and
    by HLO op, the number of device events, and the time covered by at least one kernel."""
    (path,) = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz"))
    with gzip.open(path, "rb") as f:
        events = json.load(f)["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, name in procs.items() if "GPU" in name or "gpu" in name or "device:" in name.lower()}
    by_name, by_kind, by_op, n_kernels = collections.Counter(), collections.Counter(), collections.Counter(), 0
    args, spans = {}, []
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e:
            by_name[e["name"]] += e["dur"] / per / 1e3  # ms per unit
            by_kind[_kind(e["name"])] += e["dur"] / per / 1e3
            a = e.get("args") or {}
            by_op[str(a.get("hlo_op") or a.get("long_name") or e["name"])] += e["dur"] / per / 1e3
            args.setdefault(e["name"], {k: str(v)[:200] for k, v in a.items()})
            spans.append((e["ts"], e["ts"] + e["dur"]))
            n_kernels += 1
    spans.sort()
    busy, end = 0.0, None  # device time covered by at least one kernel (streams overlap)
    for a0, a1 in spans:
        if end is None or a0 > end:
            busy, end = busy + (a1 - a0), a1
        elif a1 > end:
            busy, end = busy + (a1 - end), a1
    return {"device_events_per_step": round(n_kernels / per),  # launch-bound if wall >> kernel time
            "device_processes": sorted(procs[p] for p in gpu),
            "kernel_ms_per_step": round(sum(by_kind.values()), 3),
            "busy_ms_per_step": round(busy / per / 1e3, 3),  # wall - busy: gaps between kernels (launches)
            "by_kind_ms": {k: round(v, 3) for k, v in by_kind.most_common()},
            "top_kernels_ms": [[k[:160], round(v, 3)] for k, v in by_name.most_common(40)],
            "top_ops_ms": [[k[:160], round(v, 3)] for k, v in by_op.most_common(60)],
            "kernel_args": {k[:160]: args[k] for k, _ in by_name.most_common(12)}}


def unet_step_profile(preset: str, images: int, size: int, iters: int, trace_dir: str, hlo_out: str | None) -> dict:
    """Kernel times of `iters` U-Net steps (images + CFG rows, bf16) called one by one, from a profiler trace;
    with `hlo_out`, XLA's optimized HLO of the step is written there (gzip) so that kernel names (fusion names)
    can be traced back to their ops and flax modules (the ops' metadata) without a device. Called alone, a step
    also casts and re-lays out its weights (in the sampling loop that happens once): see `loop_profile`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ldm_jax.bench import make_model

    sd, rng = make_model(preset, jnp.bfloat16), np.random.default_rng(0)
    cfg = sd.config
    lat, b = size // sd.latent_factor, 2 * images
    x = jnp.asarray(rng.standard_normal((b, lat, lat, cfg.unet.in_channels), np.float32))
    t = jnp.full((b,), 500, jnp.int32)
    ctx = jnp.asarray(rng.standard_normal((b, cfg.text.max_length, cfg.unet.d_cond), np.float32))
    step = jax.jit(sd.predict_noise).lower(sd.params, x, t, ctx).compile()
    if hlo_out:
        with gzip.open(hlo_out, "wt") as f:
            f.write(step.as_text())
    jax.block_until_ready(step(sd.params, x, t, ctx))
    jax.block_until_ready(step(sd.params, x, t, ctx))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = step(sd.params, x, t, ctx)
    jax.block_until_ready(out)
    wall_ms = (time.perf_counter() - t0) / iters * 1e3
    with jax.profiler.trace(trace_dir):
        for _ in range(iters):
            out = step(sd.params, x, t, ctx)
        jax.block_until_ready(out)
    return {"images": images, "batch": b, "wall_ms_per_step": round(wall_ms, 3), **_trace_summary(trace_dir, iters)}


def loop_profile(preset: str, images: int, size: int, steps: int, trace_dir: str) -> dict:
    """Kernel times of one whole txt2img program (text encoder, `steps` DDIM steps with CFG, VAE decode) per
    sampling step: what the end-to-end time is made of, weights cast and laid out once before the loop."""
    import jax
    import jax.numpy as jnp

    from ldm_jax.bench import make_model
    from ldm_jax.pipelines import Timings, txt2img

    sd = make_model(preset, jnp.bfloat16)
    request = dict(steps=steps, height=size, width=size)
    txt2img(sd, ["a cat"] * images, **request)  # compile
    tm = Timings()
    txt2img(sd, ["a cat"] * images, **request, timings=tm)
    with jax.profiler.trace(trace_dir):
        txt2img(sd, ["a cat"] * images, **request, seed=1)
    return {"images": images, "batch": 2 * images, "end_to_end_s": round(tm.run, 4),
            "wall_ms_per_step": round(tm.run / steps * 1e3, 3), **_trace_summary(trace_dir, steps)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="sd1")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--images", default="8", help="U-Net steps called alone: comma-separated image counts")
    ap.add_argument("--loop-images", default="8,1", help="whole txt2img programs: comma-separated image counts")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--skip-first-image", action="store_true")
    ap.add_argument("--hlo-dir", help="write each profiled step's optimized HLO here (unet_step_N.hlo.txt.gz)")
    a = ap.parse_args()
    res = {}

    def save():
        with open(a.out + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(a.out + ".tmp", a.out)

    with tempfile.TemporaryDirectory() as work:
        if not a.skip_first_image:
            cache = os.path.join(work, "cache")
            for name, log in (("first_image_cold", False), ("first_image_warm", True)):
                res[name] = first_image(a.preset, a.size, a.steps, cache, log)
                save()
                print(name, json.dumps(res[name], indent=1), flush=True)
        for n in map(int, filter(None, a.images.split(","))):
            name = f"unet_step_{n}"
            try:
                hlo = a.hlo_dir and os.path.join(a.hlo_dir, f"{name}.hlo.txt.gz")
                res[name] = unet_step_profile(a.preset, n, a.size, a.iters, os.path.join(work, f"trace{n}"), hlo)
            except Exception as e:  # noqa: BLE001 - keep the figures before it
                res[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
            save()
            print(name, json.dumps(res[name], indent=1), flush=True)
        for n in map(int, filter(None, a.loop_images.split(","))):
            name = f"txt2img_{n}"
            try:
                res[name] = loop_profile(a.preset, n, a.size, a.steps, os.path.join(work, f"loop{n}"))
            except Exception as e:  # noqa: BLE001 - keep the figures before it
                res[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
            save()
            print(name, json.dumps(res[name], indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
