"""A/B of the speed options for issue 6 in one device call: end-to-end txt2img (bf16, 50 DDIM steps, CFG 7.5) per
variant, each in a fresh process (XLA flags are read once per process), highest priority first, within a wall-clock
budget so that a call never runs past its limit. Results go to --out after every variant.

    PYTHONPATH=. python scripts/gpu_ab.py --out $OUT/ab.json --budget 480          # on the GPU machine
    PYTHONPATH=. python scripts/gpu_ab.py --out ab.json --preset tiny --size 64 --steps 4 --variants baseline

Variants (see VARIANTS): the default build; the cuDNN head-dim limit of the previous release (128: SD 1.x's 160-wide
heads on XLA); nearest upsampling before the 3x3 conv instead of the sub-pixel form (with the VAE decode timed
alone); XLA attention everywhere; two-pass, unshifted and chunked one-pass GroupNorm/LayerNorm statistics; GEGLU's
GELU through jax.nn.gelu (erfc); im2col matmuls for the small convolutions of the 1-image U-Net; XLA flags for
command buffers (CUDA graphs) around the sampling loop, around the convolutions too (with and without the loop),
without command buffers, without Triton GEMMs, with the latency-hiding scheduler, without XLA's merging of dots that
share an input, with Triton allowed any GEMM; 16 images (memory); bf16 vs fp32 images from the same x_T (PSNR); and,
after the default build, a new process's first image from the caches it left (weights loading while the program
is read from the program cache, the same with JAX's compilation cache alone, one after the other, then from an fp16
.safetensors as `ldm-jax txt2img --checkpoint` reads one).
Random SD 1.x weights are drawn once (numpy, ~20 s); every worker maps them from one .npy file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CMD_BUFFER_ALL = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
# name -> (XLA_FLAGS, in-process options, image counts); the order is the priority.
VARIANTS = {
    "baseline": ("", {"vae": True}, (1, 8)),
    "cudnn_head_dim_128": ("", {"cudnn_head_dim": 128}, (8,)),
    "batch_16": ("", {}, (16,)),  # the memory report: program and peak memory at 16 images
    "upsample_then_conv": ("", {"subpixel": False, "vae": True}, (8,)),
    "psnr_bf16_vs_fp32": ("", {"psnr": True}, (1,)),  # the image-quality report, same x_T
    "command_buffer_while": (f"--xla_gpu_enable_command_buffer={CMD_BUFFER_ALL}", {}, (1, 8)),
    # cuDNN convolutions inside the CUDA graphs too (XLA leaves them out by default, so each one splits the
    # graph); on jax 0.11.2 both fail at run time with a cuDNN error while capturing (2026-11-27)
    "command_buffer_conv": ("--xla_gpu_enable_command_buffer=+CONVOLUTION", {}, (1, 8)),
    "command_buffer_conv_while": ("--xla_gpu_enable_command_buffer=+CONVOLUTION,+WHILE,+CONDITIONAL", {}, (1, 8)),
    "norm_two_pass": ("", {"norm": "two_pass"}, (1, 8)),  # the default before 2026-11-27, for 16-bit inputs too
    "norm_unshifted": ("", {"norm": "unshifted"}, (1, 8)),
    "norm_split16": ("", {"norm": "split16"}, (1, 8)),  # GroupNorm statistics over 16 chunks of positions
    # GEGLU's GELU as jax.nn.gelu computes it (erfc, in the input dtype): the previous default (now erf in fp32)
    "gelu_erfc": ("", {"gelu": "erfc"}, (1, 8)),
    # the CPU's im2col matmul for small 3x3 convs on the GPU too: at 1 image (U-Net batch 2) the 8x8 and 16x16
    # levels give cuDNN 128-512 output positions, few thread blocks for its implicit GEMM
    "im2col_small_convs": ("", {"im2col_positions": 512}, (1,)),
    "no_triton_gemm": ("--xla_gpu_enable_triton_gemm=false", {}, (8,)),
    "attention_xla": ("", {"attention": "xla"}, (8,)),
    "no_command_buffer": ("--xla_gpu_enable_command_buffer=", {}, (1,)),
    "latency_hiding": ("--xla_gpu_enable_latency_hiding_scheduler=true", {}, (8,)),
    # XLA merges dots that share an input (self-attention's to_q/to_k/to_v: one [C, 3C] GEMM) and then slices
    # its output, copying q, k and v out again (2 x 0.13 ms of the 8-image step at 64x64); 0 turns that off
    "no_dot_merger": ("--xla_gpu_dot_merger_threshold_mb=0", {}, (1, 8)),
    # Triton may take any GEMM (with its elementwise producers fused in, e.g. GEGLU's multiply before net_2)
    "triton_gemm_any": ("--xla_gpu_triton_gemm_any=true", {}, (8,)),
}


def _unshifted_moments(g, axes):
    """layers._moments_one_pass without its shift: E[g^2] - E[g]^2 (what the 2026-11-27 A/B measured)."""
    import jax.numpy as jnp

    mean = g.mean(axis=axes, keepdims=True)
    return mean, jnp.maximum(jnp.square(g).mean(axis=axes, keepdims=True) - jnp.square(mean), 0.0)


def _split_moments(g, axes, parts: int = 16):
    """layers._moments_one_pass with GroupNorm's positions split into `parts` chunks summed separately, then
    added: XLA's column reduction over 4096 positions x 320 channels per image gets `parts` times as many
    independent columns (the statistics reductions ran at 1.4-1.7 TB/s on the H200, adds at 4.1-4.7)."""
    import jax.numpy as jnp

    from ldm_jax.models import layers

    axes = tuple(a % g.ndim for a in axes)
    b, p = g.shape[:2]
    if axes != (1, 3) or p % parts or p < 64 * parts:  # LayerNorm, and GroupNorm at small sizes: as before
        return layers._moments_one_pass_default(g, axes)
    s = g[:, :1, :, :1]  # each group's first element, the shift (as layers._moments_one_pass)
    d = (g - s).reshape((b, parts, p // parts) + g.shape[2:])
    n = p * g.shape[3]
    m1 = d.sum(axis=(2, 4)).sum(axis=1)[:, None, :, None] / n
    m2 = jnp.square(d).sum(axis=(2, 4)).sum(axis=1)[:, None, :, None] / n
    return s + m1, jnp.maximum(m2 - jnp.square(m1), 0.0)


def _psnr_bf16_vs_fp32(params, cfg, prompt: str, size: int, steps: int) -> dict:
    """txt2img in fp32 and in bf16 from the same x_T and the same weights: PSNR of the two images."""
    import jax.numpy as jnp
    import numpy as np

    from ldm_jax.images import psnr
    from ldm_jax.pipelines import Timings, txt2img
    from ldm_jax.stable_diffusion import StableDiffusion

    lat = size // cfg.vae.downsample_factor
    x_T = np.random.default_rng(0).standard_normal((1, lat, lat, 4)).astype(np.float32)
    out, res = {}, {}
    for name, dt in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        tm = Timings()
        sd = StableDiffusion(cfg, params, dtype=dt)
        out[name] = txt2img(sd, [prompt], steps=steps, latents=x_T, height=size, width=size, timings=tm)
        res[f"txt2img_1_{name}_compile_s"] = round(tm.compile, 1)
    res["psnr_db"] = round(psnr(out["bf16"], out["fp32"]), 2)
    return res


def worker(spec: dict) -> dict:
    """One variant in this process: load the weights, compile and time txt2img for each image count."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ldm_jax.bench import _mem_mb, bench_vae, device_name, fused_attention_calls
    from ldm_jax.configs import preset
    from ldm_jax.models import attention, layers
    from ldm_jax.models.build import abstract_params
    from ldm_jax.pipelines import Timings, txt2img
    from ldm_jax.stable_diffusion import StableDiffusion

    opts = spec["options"]
    if "cudnn_head_dim" in opts:
        attention._max_cudnn_head_dim = lambda: opts["cudnn_head_dim"]
    if opts.get("norm"):  # GroupNorm/LayerNorm statistics of 16-bit inputs
        layers._moments_one_pass_default = layers._moments_one_pass
        layers._moments_one_pass = {"two_pass": layers._moments, "unshifted": _unshifted_moments,
                                    "split16": _split_moments}[opts["norm"]]
    if opts.get("gelu") == "erfc":
        attention.gelu_exact = lambda x: jax.nn.gelu(x, approximate=False)
    if "im2col_positions" in opts:
        layers._IM2COL_BACKENDS, layers._IM2COL_MAX_POSITIONS = ("cpu", "gpu"), opts["im2col_positions"]
    if opts.get("subpixel") is False:  # the previous release: nearest 2x upsampling, then the 3x3 conv
        layers._SUBPIXEL_MIN_POSITIONS = 2**62
    cfg = preset(spec["preset"])
    shapes, treedef = jax.tree_util.tree_flatten(abstract_params(cfg))
    flat = np.load(spec["params"], mmap_mode="r")
    offsets = np.cumsum([0] + [int(np.prod(s.shape)) for s in shapes])
    params = jax.tree_util.tree_unflatten(treedef, [jax.device_put(np.asarray(flat[a:b]).reshape(s.shape))
                                                    for s, a, b in zip(shapes, offsets[:-1], offsets[1:])])
    out = {"device": device_name()}
    prompt = "a photograph of an astronaut riding a horse"
    size, steps = spec["size"], spec["steps"]
    if opts.get("psnr"):
        return {**out, **_psnr_bf16_vs_fp32(params, cfg, prompt, size, steps)}
    sd = StableDiffusion(cfg, params, dtype=jnp.bfloat16, attention_impl=opts.get("attention", "auto"))
    for n in spec["images"]:
        tm, ts = Timings(), []
        first = txt2img(sd, [prompt] * n, steps=steps, height=size, width=size, seed=0, timings=tm)
        compile_s = tm.compile
        for i in range(spec["iters"]):
            txt2img(sd, [prompt] * n, steps=steps, height=size, width=size, seed=i + 1, timings=tm)
            ts.append(tm.run)
        prog = [v for k, v in sd.cache.items() if k[0] == "program"][-1]
        out[str(n)] = {"seconds": round(float(np.median(ts)), 4), "all_s": [round(t, 4) for t in ts],
                       "compile_s": round(compile_s, 2), "program_mb": _mem_mb(prog),
                       "cudnn_attention": fused_attention_calls(prog), "image_mean": float(first.mean())}
    if opts.get("vae"):  # the VAE decode alone, 8 images (the sub-pixel upsampling is most of its change)
        out["vae_decode_8_s"] = round(bench_vae(sd, 8, size // sd.latent_factor, spec["iters"], "bf16").seconds, 5)
    stats = jax.devices()[0].memory_stats() or {}
    out["peak_bytes_in_use_mb"] = round(stats.get("peak_bytes_in_use", 0) / 2**20, 1)
    return out


def _save_params(preset_name: str, path: str) -> None:
    """The random weights as one flat .npy at `path` (the workers' input), and as the fp16 CompVis .safetensors
    `ldm-jax random-checkpoint` writes, next to it (the first image from a checkpoint file)."""
    import jax
    import numpy as np

    from convert.mapping import params_to_state_dict
    from convert.safetensors_io import write_safetensors
    from ldm_jax.configs import preset
    from ldm_jax.loading import CONFIG_METADATA_KEY
    from ldm_jax.models.build import random_params

    config = preset(preset_name)
    params = random_params(config, 0)
    np.save(path, np.concatenate([a.ravel() for a in jax.tree_util.tree_leaves(params)]))
    write_safetensors(_checkpoint_path(path), params_to_state_dict(params, dtype=np.float16),
                      {CONFIG_METADATA_KEY: config.to_json(), "format": "pt"})


def _checkpoint_path(params_path: str) -> str:
    return os.path.join(os.path.dirname(params_path), "random-fp16.safetensors")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file, rewritten after every variant")
    ap.add_argument("--budget", type=float, default=480, help="seconds for the whole run (default 480)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset, in priority order")
    ap.add_argument("--preset", default="sd1")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--save-params", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(json.loads(a.worker))), flush=True)
        return 0
    if a.save_params:
        _save_params(a.preset, a.save_params)
        return 0
    names = a.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"error: unknown variants {unknown}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    deadline = time.monotonic() + a.budget
    res = {"budget_s": a.budget, "variants": {}}

    def save():
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, a.out)

    with tempfile.TemporaryDirectory() as work:
        t0 = time.monotonic()
        params_path = os.path.join(work, "params.npy")
        # in a CPU-only process: this one must not hold the GPU (JAX would preallocate most of its memory here)
        subprocess.run([sys.executable, __file__, "--out", a.out, "--preset", a.preset, "--save-params", params_path],
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), check=True)
        res["random_params_s"] = round(time.monotonic() - t0, 1)
        cache = os.path.join(work, "cache")  # shared: XLA flags are part of the cache key, autotuning is reused
        est = None  # seconds of the last finished variant per image count, to skip what cannot finish in time
        for name in names:
            flags, options, images = VARIANTS[name]
            left = deadline - time.monotonic()
            if est is not None and est * len(images) > left:
                res["variants"][name] = {"skipped": f"{left:.0f} s left, ~{est * len(images):.0f} s needed"}
                save()
                continue
            spec = dict(options=options, preset=a.preset, params=params_path, size=a.size, steps=a.steps,
                        iters=a.iters, images=images)
            env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip(),
                       LDM_JAX_CACHE_DIR=cache)
            t1 = time.monotonic()
            try:
                p = subprocess.run([sys.executable, __file__, "--out", a.out, "--worker", json.dumps(spec)],
                                   env=env, capture_output=True, text=True, timeout=max(left, 1))
                lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                entry = json.loads(lines[-1][7:]) if lines else {"error": (p.stderr.strip().splitlines()
                                                                           or ["no output"])[-1][-400:]}
            except subprocess.TimeoutExpired:
                entry = {"error": "timed out (budget)"}
            wall = time.monotonic() - t1
            entry.update(xla_flags=flags, options=options, wall_s=round(wall, 1))
            res["variants"][name] = entry
            if "error" not in entry and not options.get("psnr"):  # two compiles at one image: no estimate
                est = wall / len(images)
            save()
            print(name, json.dumps(entry), flush=True)
            if name == "baseline" and "error" not in entry and deadline - time.monotonic() > 60:
                from ldm_jax.bench import first_image_process

                # a new process, the cache the baseline left: import, weights (zeros), program, one image; with
                # the weights loading while the program is read from the program cache (as the CLI), the same
                # with a warm-up run on device zeros while the weights load, then with JAX's compilation cache
                # alone (trace, lower, cache hit), then one after the other; then as `ldm-jax txt2img
                # --checkpoint` with an fp16 .safetensors (read, upcast, relayout, onto the device)
                no_program_cache = {"LDM_JAX_NO_PROGRAM_CACHE": "1"}
                for mode, overlap, ckpt, env, warm_up in (
                        ("overlap", True, None, None, False), ("overlap_warm_up", True, None, None, True),
                        ("overlap_no_program_cache", True, None, no_program_cache, False),
                        ("serial", False, None, None, False),
                        ("checkpoint_overlap", True, _checkpoint_path(params_path), None, False)):
                    seconds, phases, p = first_image_process(a.preset, "bfloat16", a.size, a.steps, cache, env=env,
                                                             overlap=overlap, checkpoint=ckpt, warm_up=warm_up)
                    res[f"first_image_{mode}"] = {"to_image_s": seconds and round(seconds, 2), "phases_s": phases}
                    if p.returncode != 0:
                        res[f"first_image_{mode}"]["error"] = (p.stderr.strip().splitlines() or ["?"])[-1][-400:]
                    print(f"first image, warm cache, {mode}:", json.dumps(res[f"first_image_{mode}"]), flush=True)
                res["first_image_warm_cache_s"] = res["first_image_overlap"]["to_image_s"]
                save()
    base = res["variants"].get("baseline", {})
    for name, v in res["variants"].items():
        cells = [f"{n} img {v[n]['seconds']:.3f} s ({v[n]['seconds'] / base[n]['seconds']:.3f}x)"
                 if n in v and n in base else (f"{n} img {v[n]['seconds']:.3f} s" if n in v else "")
                 for n in ("1", "8", "16")]
        if "vae_decode_8_s" in v:
            cells.append(f"VAE decode 8 img {v['vae_decode_8_s'] * 1e3:.1f} ms")
        if "psnr_db" in v:
            cells.append(f"PSNR {v['psnr_db']} dB")
        print(f"{name:<22}" + "  ".join(c for c in cells if c) + (f"  {v.get('error') or v.get('skipped')}"
                                                                   if "error" in v or "skipped" in v else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
