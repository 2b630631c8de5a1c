"""`ldm-jax bench`: time the U-Net step, the VAE decode, end-to-end txt2img and compilation, with random
weights of a preset (no download), and optionally the torch reference on the same device.

Each measurement is a row (what, device, precision, batch, steps, seconds, images/s, ...); `run_bench`
returns them and the CLI prints a table and writes JSON. Times are medians over `iters` runs after a
warm-up, with `block_until_ready`; compile times come from `jit(...).lower().compile()`. Peak memory of
a program is XLA's own accounting (`compiled.memory_analysis()`: arguments + outputs + temporaries).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.configs import preset
from ldm_jax.models.build import random_params
from ldm_jax.stable_diffusion import StableDiffusion


@dataclass
class Row:
    what: str
    impl: str
    device: str
    precision: str
    batch: int  # U-Net batch (2 x images with CFG) or images
    images: int
    seconds: float
    steps: int | None = None
    size: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 and self.what.startswith("txt2img") else None


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', d.platform)}"


def _time(fn, *args, iters: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _mem_mb(compiled) -> float | None:
    try:
        m = compiled.memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        return round(total / 2**20, 1)
    except Exception:  # not every backend reports it
        return None


def make_model(preset_name: str, dtype, seed: int = 0, attention_impl: str = "auto") -> StableDiffusion:
    cfg = preset(preset_name)
    params = jax.device_put(random_params(cfg, seed))
    return StableDiffusion(cfg, params, dtype=dtype, attention_impl=attention_impl)


def bench_unet(sd, images: int, latent: int, iters: int, prec: str) -> Row:
    rng = np.random.default_rng(0)
    b = 2 * images
    x = jnp.asarray(rng.standard_normal((b, latent, latent, 4)), jnp.float32)
    t = jnp.full((b,), 500, jnp.int32)
    ctx = jnp.asarray(rng.standard_normal((b, 77, sd.config.unet.d_cond)), jnp.float32)
    t0 = time.perf_counter()
    compiled = jax.jit(sd.predict_noise).lower(sd.params, x, t, ctx).compile()
    compile_s = time.perf_counter() - t0
    s = _time(compiled, sd.params, x, t, ctx, iters=iters)
    return Row("unet_step_cfg", "ldm-jax", device_name(), prec, b, images, s, size=latent * sd.latent_factor,
               extra={"compile_s": round(compile_s, 2), "program_mb": _mem_mb(compiled)})


def bench_vae(sd, images: int, latent: int, iters: int, prec: str) -> Row:
    z = jnp.asarray(np.random.default_rng(1).standard_normal((images, latent, latent, 4)), jnp.float32)
    compiled = jax.jit(sd.decode_latents).lower(sd.params, z).compile()
    s = _time(compiled, sd.params, z, iters=iters)
    return Row("vae_decode", "ldm-jax", device_name(), prec, images, images, s, size=latent * sd.latent_factor,
               extra={"program_mb": _mem_mb(compiled)})


def bench_txt2img(sd, images: int, size: int, steps: int, iters: int, prec: str) -> Row:
    from ldm_jax.pipelines.generate import Timings, txt2img

    prompts = ["a photograph of an astronaut riding a horse"] * images
    tm = Timings()
    txt2img(sd, prompts, steps=steps, height=size, width=size, seed=0, timings=tm)
    compile_s = tm.compile
    ts = []
    for i in range(iters):
        txt2img(sd, prompts, steps=steps, height=size, width=size, seed=i + 1, timings=tm)
        ts.append(tm.run)
    prog = [v for k, v in sd.cache.items() if k[0] == "program"][-1]  # the one just compiled
    return Row("txt2img", "ldm-jax", device_name(), prec, 2 * images, images, statistics.median(ts), steps, size,
               extra={"compile_s": round(compile_s, 2), "program_mb": _mem_mb(prog)})


def bench_torch_unet(cfg, images: int, latent: int, iters: int, factor: int = 8) -> Row:
    """labml's U-Net (the parity reference) on the same device: fp16 on CUDA, fp32 on CPU."""
    from convert.torch_reference import build_unet, import_torch

    torch = import_torch()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.float16 if dev == "cuda" else torch.float32
    m = build_unet(cfg).to(dev, dt).eval()
    b = 2 * images
    x = torch.randn(b, 4, latent, latent, device=dev, dtype=dt)
    t = torch.full((b,), 500, device=dev)
    c = torch.randn(b, 77, cfg.unet.d_cond, device=dev, dtype=dt)

    def step():
        # labml builds its time embedding in fp32: autocast feeds fp16 to the fp16 layers on CUDA.
        with torch.inference_mode(), torch.autocast(dev, dtype=dt, enabled=dev == "cuda"):
            m(x, t, c)
        if dev == "cuda":
            torch.cuda.synchronize()

    step()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    return Row("unet_step_cfg", "labml-torch", f"torch:{name}", "fp16" if dev == "cuda" else "fp32", b, images,
               statistics.median(ts), size=latent * factor, extra={"threads": torch.get_num_threads()})


def first_image_seconds(preset_name: str, dtype: str, size: int, steps: int, cache: str) -> float:
    """Wall time of a fresh process from start to its first image (zero weights: values don't change time)."""
    code = (f"import time; t0 = time.perf_counter(); import jax, jax.numpy as jnp; from ldm_jax.configs import preset;"
            f"from ldm_jax.models.build import abstract_params; from ldm_jax.stable_diffusion import StableDiffusion;"
            f"from ldm_jax.pipelines import txt2img; cfg = preset({preset_name!r});"
            f"p = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_params(cfg));"
            f"sd = StableDiffusion(cfg, p, dtype=jnp.dtype({dtype!r}).type);"
            f"txt2img(sd, 'a cat', steps={steps}, height={size}, width={size});"
            f"print('FIRST_IMAGE', time.perf_counter() - t0)")
    env = dict(os.environ, LDM_JAX_CACHE_DIR=cache)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr else "first-image run failed")
    return wall


def run_bench(*, preset_name="sd1", dtype="bfloat16", images=(1, 8), size=512, steps=50, iters=5,
              e2e=True, torch_ref=False, cold_warm=False, log=print) -> list[Row]:
    dt = jnp.dtype(dtype).type
    prec = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}[jnp.dtype(dtype).name]
    log(f"building random {preset_name} weights ...")
    sd = make_model(preset_name, dt)
    latent = size // sd.latent_factor
    rows = []
    for n in images:
        log(f"U-Net step, {n} image(s) + CFG ...")
        rows.append(bench_unet(sd, n, latent, iters, prec))
        if torch_ref:
            rows.append(bench_torch_unet(sd.config, n, latent, iters, sd.latent_factor))
    log(f"VAE decode, {max(images)} image(s) ...")
    rows.append(bench_vae(sd, max(images), latent, iters, prec))
    if e2e:
        for n in images:
            log(f"txt2img {n} image(s), {steps} DDIM steps, {size}x{size} ...")
            rows.append(bench_txt2img(sd, n, size, steps, max(1, iters // 2), prec))
    if cold_warm:
        with tempfile.TemporaryDirectory() as cache:
            log("first image in a new process: cold cache, then warm ...")
            cold = first_image_seconds(preset_name, jnp.dtype(dtype).name, size, steps, cache)
            warm = first_image_seconds(preset_name, jnp.dtype(dtype).name, size, steps, cache)
        rows.append(Row("first_image_new_process", "ldm-jax", device_name(), prec, 2, 1, warm, steps, size,
                        extra={"cold_s": round(cold, 2), "warm_s": round(warm, 2)}))
    return rows


def format_rows(rows: list[Row]) -> str:
    head = f"{'what':<24}{'impl':<13}{'device':<28}{'prec':<6}{'imgs':>5}{'batch':>6}{'steps':>6}{'size':>6}" \
           f"{'ms':>10}{'img/s':>8}  extra"
    lines = [head]
    for r in rows:
        ips = f"{r.images_per_s:.2f}" if r.images_per_s else "-"
        lines.append(f"{r.what:<24}{r.impl:<13}{r.device[:27]:<28}{r.precision:<6}{r.images:>5}{r.batch:>6}"
                     f"{(r.steps or '-')!s:>6}{(r.size or '-')!s:>6}{r.seconds * 1e3:>10.1f}{ips:>8}  "
                     + " ".join(f"{k}={v}" for k, v in r.extra.items()))
    return "\n".join(lines)


def rows_as_dicts(rows: list[Row]) -> list[dict]:
    return [dict(asdict(r), images_per_s=r.images_per_s) for r in rows]
