"""`ldm-jax bench`: time the U-Net step, the VAE decode, end-to-end txt2img and compilation, with random
weights of a preset (no download), and optionally the torch reference on the same device.

Each measurement is a row (what, device, precision, batch, steps, seconds, images/s, ...); `run_bench`
returns them and the CLI prints a table and writes JSON. Times are medians over `iters` runs after a
warm-up, with `block_until_ready`; compile times come from `jit(...).lower().compile()`. Peak memory of
a program is XLA's own accounting (`compiled.memory_analysis()`: arguments + outputs + temporaries).
"""

from __future__ import annotations

import json
import math
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


PRECISION = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}  # dtype name -> the tables' label


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
        """End-to-end images/s (txt2img) or training images/s (train_step); None for other rows or no timing."""
        ok = self.what in ("txt2img", "train_step") and math.isfinite(self.seconds) and self.seconds > 0
        return self.images / self.seconds if ok else None


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


def fused_attention_calls(compiled) -> int | None:
    """cuDNN fused-attention kernels (custom calls `__cudnn$fmha*`) in a compiled program's HLO: the check that
    `attention(impl="auto")` really took the cuDNN path (SD 1.x's U-Net has 32 attention calls, 16 transformers
    x 2, counted once inside the sampling loop). 0 on CPU; None if the backend gives no HLO text."""
    try:
        return compiled.as_text().count('custom_call_target="__cudnn$fmha')
    except Exception:  # noqa: BLE001 - not every backend/version exposes the text
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
    adm = sd.config.unet.adm_in_channels  # SDXL's vector conditioning
    y = (jnp.asarray(rng.standard_normal((b, adm)), jnp.float32),) if adm else ()
    t0 = time.perf_counter()
    compiled = jax.jit(sd.predict_noise).lower(sd.params, x, t, ctx, *y).compile()
    compile_s = time.perf_counter() - t0
    s = _time(compiled, sd.params, x, t, ctx, *y, iters=iters)
    return Row("unet_step_cfg", "ldm-jax", device_name(), prec, b, images, s, size=latent * sd.latent_factor,
               extra={"compile_s": round(compile_s, 2), "program_mb": _mem_mb(compiled),
                      "cudnn_attention": fused_attention_calls(compiled)})


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
               extra={"compile_s": round(compile_s, 2), "program_mb": _mem_mb(prog),
                      "cudnn_attention": fused_attention_calls(prog)})


def bench_train(preset_name: str, batch: int, size: int, iters: int, dtype="float32", remat: bool = False,
                grad_accum: int = 1, optim=None, step_cfg=None, seed: int = 0, lora_rank: int = 0) -> Row:
    """One optimiser step of `ldm-jax train` (frozen VAE encode + text encode, U-Net forward/backward, AdamW, EMA)
    on random weights and random images, data-parallel over every device: median seconds per step, images/s and
    the compiled step's peak memory (XLA memory_analysis; params, EMA, optimiser state, batch and temporaries).
    `optim` / `step_cfg` (state.OptimConfig / step.StepConfig) default to the training defaults (`lora_rank` > 0:
    a LoRA of that rank on the attention projections, the U-Net frozen). The step is
    compiled from shapes alone; on the CPU it only runs when that peak fits in the available host memory
    (otherwise seconds is NaN and extra["skipped"] says why)."""
    from ldm_jax import parallel
    from ldm_jax.errors import UserError
    from ldm_jax.models.build import abstract_params
    from ldm_jax.train.base import check_resolution, check_trainable
    from ldm_jax.train.state import OptimConfig, abstract_state, init_state
    from ldm_jax.train.step import (StepConfig, abstract_trainable, batch_sharding, frozen_inputs, initial_params,
                                    jitted_train_step, key_data, shard_batch)

    cfg = preset(preset_name)
    check_trainable(cfg)
    check_resolution(cfg, size)
    mesh = parallel.data_mesh()
    if batch % mesh.devices.size:
        raise UserError(f"the batch ({batch}) must be a multiple of the device count ({mesh.devices.size})")
    prec = PRECISION.get(jnp.dtype(dtype).name)
    if prec not in ("bf16", "fp32"):
        raise UserError(f"training runs in float32 or bfloat16 (fp32 master params), not {jnp.dtype(dtype).name}")
    optim = optim or OptimConfig()
    step_cfg = step_cfg or StepConfig(grad_accum=grad_accum, precision=prec, remat=remat, lora_rank=lora_rank)
    k, text = step_cfg.grad_accum, cfg.text
    rep, rows = parallel.replicated(mesh), batch_sharding(mesh)
    abstract = abstract_params(cfg)
    frozen_names = [c for c in abstract if c != "unet" or step_cfg.lora_rank]  # VAE, text encoder(s), LoRA's U-Net
    batch_spec = {"images": jax.ShapeDtypeStruct((k, batch, size, size, 3), jnp.float32, sharding=rows),
                  "ids": jax.ShapeDtypeStruct((k, batch, text.max_length), jnp.int32, sharding=rows)}
    if cfg.is_sdxl:
        batch_spec["sizes"] = jax.ShapeDtypeStruct((k, batch, 6), jnp.float32, sharding=rows)
    args = (parallel.abstract_like(abstract_state(abstract_trainable(cfg, step_cfg), optim), rep), batch_spec,
            jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
            parallel.abstract_like({**{c: abstract[c] for c in frozen_names},
                                    "uncond_ids": jax.ShapeDtypeStruct((1, text.max_length), jnp.int32)}, rep))
    t0 = time.perf_counter()
    compiled = jitted_train_step(cfg, optim, step_cfg, mesh).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    images, mem = batch * k, _mem_mb(compiled)
    extra = {"grad_accum": k, "compile_s": round(compile_s, 2), "program_mb": mem}
    label = step_cfg.precision + ("+remat" if step_cfg.remat else "") + (
        f"+lora{step_cfg.lora_rank}" if step_cfg.lora_rank else "")
    available = _available_mb()
    if jax.default_backend() == "cpu" and mem and available and mem > 0.9 * available:
        extra["skipped"] = f"needs ~{mem / 1024:.1f} GiB, {available / 1024:.1f} GiB available"
        return Row("train_step", "ldm-jax", device_name(), label, batch, images, float("nan"), size=size, extra=extra)
    params = jax.device_put(random_params(cfg, seed))
    state = init_state(parallel.replicate(initial_params(StableDiffusion(cfg, params), step_cfg, seed), mesh), optim,
                       rep)
    sd = StableDiffusion(cfg, {c: params[c] for c in frozen_names})
    frozen = frozen_inputs(sd.params, sd.tokenize([""]), mesh, unet=bool(step_cfg.lora_rank))
    del params
    key = parallel.replicate(key_data(seed), mesh)
    rng = np.random.default_rng(seed)
    ids = sd.tokenize(["a photograph of an astronaut riding a horse"] * images)
    local = {"images": rng.uniform(-1, 1, (k, batch, size, size, 3)).astype(np.float32),
             "ids": ids.reshape(k, batch, -1)}
    if cfg.is_sdxl:  # original = target size, no crop
        from ldm_jax.conditioning import size_numbers

        local["sizes"] = np.asarray(size_numbers(k * batch, (size, size))).reshape(k, batch, 6)
    data = shard_batch(local, mesh)
    ts = []
    for _ in range(iters + 1):  # the first run is a warm-up
        t0 = time.perf_counter()
        state, metrics = compiled(state, data, key, frozen)
        jax.block_until_ready((state, metrics))
        ts.append(time.perf_counter() - t0)
    s = statistics.median(ts[1:])
    extra["images_per_s"] = round(images / s, 2)
    return Row("train_step", "ldm-jax", device_name(), label, batch, images, s, size=size, extra=extra)


def txt2img_program_memory(preset_name: str, images: int, size: int, steps: int, dtype="bfloat16") -> Row:
    """XLA's peak memory of the whole txt2img program (text encoding, `steps` DDIM steps with CFG, decode) for
    `images` images, compiled from shapes alone on the default device (no weights, nothing runs): arguments (fp32
    params, inputs) + outputs + temporaries, per device. seconds is the compile time."""
    from ldm_jax import parallel
    from ldm_jax.models.build import abstract_params
    from ldm_jax.pipelines.program import build_program, program_args

    cfg = preset(preset_name)
    mesh = parallel.data_mesh()
    plan = parallel.plan_batch(images, mesh)
    rep, rows = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    sd = StableDiffusion(cfg, {}, dtype=jnp.dtype(dtype).type)
    b, f, length = plan.padded, sd.latent_factor, cfg.text.max_length
    spec = lambda shape, dt, sharding=rows: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)  # noqa: E731
    ids = spec((b, length), jnp.int32)
    args = program_args(params=parallel.abstract_like(abstract_params(cfg), rep), ids=ids, uncond_ids=ids,
                        seeds=spec((b, 2), jnp.uint32), guidance=spec((), jnp.float32, rep),
                        eta=spec((), jnp.float32, rep), start_step=spec((), jnp.int32, rep))
    run = build_program(sd, mode="txt2img", sampler="ddim", steps=steps, output="images",
                        latent_hw=(size // f, size // f), given_latents=False, progress=None)
    t0 = time.perf_counter()
    compiled = jax.jit(run, out_shardings=rows).lower(*args).compile()
    prec = PRECISION[jnp.dtype(dtype).name]
    return Row("txt2img_program_memory", "ldm-jax", device_name(), prec, 2 * images, images,
               time.perf_counter() - t0, steps, size, extra={"program_mb": _mem_mb(compiled), "compiled_only": True})


def _available_mb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return None


# A new process as the CLI runs one: import, then the weights go onto the device on a worker thread while the
# program compiles or comes from the cache (`warm_start.compile_while`), then one image. The weights are zeros
# (values don't change time; numpy arrays put on the device in one call), or a checkpoint file read through
# `ldm_jax.load` as `ldm-jax txt2img` does. Prints its phases (seconds since the script started) and the
# wall-clock time of the image.
_FIRST_IMAGE_CHILD = """
import time; t0 = time.perf_counter(); T = {{}}
import json
import jax, jax.numpy as jnp, numpy as np
from ldm_jax.configs import preset
from ldm_jax.loading import load
from ldm_jax.models.build import abstract_params
from ldm_jax.pipelines import Timings, txt2img
from ldm_jax.stable_diffusion import StableDiffusion
from ldm_jax.warm_start import compile_while
T["import"] = time.perf_counter() - t0; jax.devices(); T["backend_init"] = time.perf_counter() - t0
cfg, dt = preset({preset!r}), jnp.dtype({dtype!r}).type
shapes = abstract_params(cfg); T["abstract_params"] = time.perf_counter() - t0
zeros = lambda: jax.block_until_ready(jax.device_put(jax.tree_util.tree_map(
    lambda s: np.zeros(s.shape, s.dtype), shapes)))
def loader():
    if {checkpoint!r} is None:
        return StableDiffusion(cfg, zeros(), dtype=dt)
    sd = load({checkpoint!r}, dtype=dt)
    jax.block_until_ready(sd.params)
    return sd
request = dict(steps={steps}, height={size}, width={size})
if {overlap!r}:
    sd, ahead = compile_while(loader, cfg, "txt2img", "a cat", dtype=dt, warm_up={warm_up!r}, **request)
    T["weights_and_program"] = time.perf_counter() - t0
    T["weights_alone"], T["program_alone"] = ahead.extra["load_s"], ahead.compile
    T["program_cache"], T["warm_up"] = ahead.extra.get("program_cache"), ahead.extra.get("warm_up_s")
else:  # one after the other: the weights, then the program (compiled or read from the cache) on first use
    t1 = time.perf_counter()
    sd = loader()
    T["weights_alone"] = time.perf_counter() - t1
tm = Timings(); txt2img(sd, "a cat", **request, timings=tm)
done = time.time(); T["first_image"] = time.perf_counter() - t0; T["run"] = tm.run
if not {overlap!r}:
    T["program_alone"], T["program_cache"] = tm.compile, tm.extra.get("program_cache")
elif "program_cache" in tm.extra:  # the adopted program was compiled again (a stored one failed its first run)
    T["program_cache_at_run"], T["recompiled_s"] = tm.extra["program_cache"], tm.compile
print("PHASES " + json.dumps({{k: round(v, 2) if isinstance(v, float) else v for k, v in T.items()}}))
print("FIRST_IMAGE", done, flush=True)
"""


def first_image_process(preset_name: str, dtype: str, size: int, steps: int, cache: str, env: dict | None = None,
                        overlap: bool = True, checkpoint: str | None = None, warm_up: bool = False):
    """Run `_FIRST_IMAGE_CHILD` in a fresh process with compilation cache `cache` (and `env` added); `overlap`:
    the weights load while the program compiles (as the CLI), else one after the other; `checkpoint`: a file
    of `preset_name`'s architecture to load the weights from (default: zeros); `warm_up`: with `overlap`, run
    the program once on device zeros if the weights are still loading (`warm_start.compile_while`). Returns
    (seconds from launch to the image in memory or None, the child's phases or None, the finished process)."""
    code = _FIRST_IMAGE_CHILD.format(preset=preset_name, dtype=dtype, size=size, steps=steps, overlap=overlap,
                                     checkpoint=checkpoint, warm_up=warm_up)
    t0 = time.time()  # wall clock on both sides: the child reports when its image exists
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, LDM_JAX_CACHE_DIR=cache, **(env or {})),
                         capture_output=True, text=True)
    lines = out.stdout.splitlines()
    done = [float(ln.split()[1]) - t0 for ln in lines if ln.startswith("FIRST_IMAGE ")]
    phases = [json.loads(ln[len("PHASES "):]) for ln in lines if ln.startswith("PHASES ")]
    return (done[-1] if done else None), (phases[-1] if phases else None), out


def first_image_seconds(preset_name: str, dtype: str, size: int, steps: int, cache: str) -> float:
    """Wall time from launching a fresh process to its first image in memory (the process's own exit, ~1 s on a
    GPU, is not counted), the way the CLI does it: `warm_start.compile_while` puts the weights on the device
    while the program compiles. The zero weights are numpy arrays put on the device in one call: `jnp.zeros` per
    parameter would compile one small program per distinct shape (79 at SD 1.x size, 3.6 s on 2 CPU cores),
    which loading a checkpoint never does."""
    seconds, _, out = first_image_process(preset_name, dtype, size, steps, cache)
    if out.returncode != 0 or seconds is None:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr else "first-image run failed")
    return seconds


def run_bench(*, preset_name="sd1", dtype="bfloat16", images=(1, 8), size=512, steps=50, iters=5,
              e2e=True, torch_ref=False, cold_warm=False, train=False, remat=False, memory=False, lora_rank=0,
              log=print) -> list[Row]:
    if memory:  # compile-only peak memory of the txt2img program: one row per image count
        rows = []
        for n in images:
            log(f"compiling txt2img for {n} image(s), {steps} steps, {size}x{size} (memory only) ...")
            rows.append(txt2img_program_memory(preset_name, n, size, steps, dtype))
        return rows
    if train:  # training throughput only: one row per batch size
        rows = []
        for n in images:
            log(f"train step, batch {n}, {size}x{size}{' (remat)' if remat else ''}"
                f"{f' (LoRA rank {lora_rank})' if lora_rank else ''} ...")
            rows.append(bench_train(preset_name, n, size, iters, dtype, remat=remat, lora_rank=lora_rank))
        return rows
    dt = jnp.dtype(dtype).type
    prec = PRECISION[jnp.dtype(dtype).name]
    log(f"building random {preset_name} weights ...")
    sd = make_model(preset_name, dt)
    latent = size // sd.latent_factor
    rows = []
    if torch_ref:  # torch lives in the convert package: ldm_jax itself never imports it
        from convert import torch_bench
        from convert.torch_reference import labml_builds

        with_diffusers, with_labml = torch_bench.diffusers_available(), labml_builds(sd.config)
        if not with_labml:
            peers = "diffusers' only" if with_diffusers else "left out (diffusers is not installed)"
            log(f"labml has no U-Net of {preset_name}'s kind (SD 2.x / XL: 64-wide heads, Linear proj): its torch "
                f"U-Net rows are {peers}")
    for n in images:
        log(f"U-Net step, {n} image(s) + CFG ...")
        rows.append(bench_unet(sd, n, latent, iters, prec))
        if torch_ref and with_labml:
            rows.append(torch_bench.bench_labml_unet(sd.config, n, latent, iters, sd.latent_factor))
        if torch_ref and with_diffusers:
            rows += torch_bench.bench_diffusers(sd.config, n, latent, iters, sd.latent_factor, vae=n == max(images))
    log(f"VAE decode, {max(images)} image(s) ...")
    rows.append(bench_vae(sd, max(images), latent, iters, prec))
    if torch_ref:
        rows.append(torch_bench.bench_labml_vae(sd.config, max(images), latent, iters, sd.latent_factor))
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
