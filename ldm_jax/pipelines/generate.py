"""txt2img, img2img and inpaint: validate the request, split it over every device (and host), run the
compiled program (`program.py`), return uint8 images (or final latents).

Randomness: image i of a request uses `fold_in(key(seed), i)` whatever the device count or batch split, so
the same seed gives the same images on 1 or 8 devices, and on 1 or 2 hosts.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from ldm_jax import parallel, program_cache, samplers
from ldm_jax.compile_cache import enable_compilation_cache
from ldm_jax.errors import UserError
from ldm_jax.images import to_unit_range
from ldm_jax.pipelines.program import build_program, check_mode, program_args
from ldm_jax.pipelines.requests import (OUTPUTS, as_list, broadcast_rows, check_aesthetic_scores, check_common,
                                        check_size, check_steps, check_strength, handover, mask_rows)

__all__ = ["Timings", "generate", "txt2img", "img2img", "inpaint", "precompile", "adopt_programs", "check_mode",
           "check_size", "check_steps", "check_strength", "OUTPUTS"]


@dataclass
class Timings:
    """Wall-clock seconds of the phases of the last request (filled when `timings=` is passed). When the request
    compiled its program, extra["program_cache"] says how: "hit", "stored", "compiled" or "off"
    (`program_cache.load_or_compile`)."""

    compile: float = 0.0
    run: float = 0.0
    cached: bool = False
    extra: dict = field(default_factory=dict)


def _pad_rows(rows, plan: parallel.BatchPlan) -> list:
    """This process's rows of the padded global batch, from all n rows (padding repeats the last row)."""
    return [rows[min(i, plan.n - 1)] for i in plan.local_indices]


def _seed_rows(seed: int, indices: np.ndarray) -> np.ndarray:
    """uint32 [B, 2]: (seed mod 2^32, image index) per row; the program derives fold_in(key(seed), index)."""
    return np.stack([np.full(len(indices), int(seed) % 2**32), np.asarray(indices)], axis=1).astype(np.uint32)


def _is_abstract(params) -> bool:
    leaves = jax.tree_util.tree_leaves(params)
    return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def _cached(sd, key, build):
    cache = sd.cache
    if key not in cache:
        cache[key] = build()
    return cache[key]


class _StepBar:
    """Per-step progress from inside the compiled loop (`jax.debug.callback`), shown with tqdm."""

    active: tqdm | None = None

    @classmethod
    def step(cls, i: int) -> None:
        """i >= 0: loop step i done; -1: sampling finished, decoding."""
        if cls.active is not None:
            if i < 0:
                cls.active.set_description("decoding")
            else:
                cls.active.update(1)


PROGRESS = (None, False, True, "steps", "elapsed")


def _wait_showing_elapsed(out, desc: str) -> None:
    """Block until `out` is computed, showing the elapsed time (a bar that needs no callback in the program)."""
    leaves = jax.tree_util.tree_leaves(out)
    with tqdm(desc=desc, bar_format="{desc}: {elapsed}", disable=None, leave=False) as bar:
        while not all(a.is_ready() for a in leaves):
            time.sleep(0.1)
            bar.refresh()


def generate(sd, mode: str, prompts, *, negative_prompts=None, steps=50, sampler="ddim", guidance_scale=7.5,
             eta=None, height=None, width=None, seed=0, latents=None, init_images=None, masks=None, strength=1.0,
             output="images", progress=False, timings: Timings | None = None, compile_only: bool = False,
             warm_up=False, denoising_start=None, denoising_end=None, aesthetic_scores=None):
    """The shared implementation of txt2img / img2img / inpaint (see those for the arguments).

    progress: False (or None); "steps" (or True), a bar advanced by every sampling step from inside the compiled
    loop (a host callback, which keeps the program out of JAX's persistent compilation cache: every new process
    compiles it again); or "elapsed", the elapsed time while the program runs (no callback: the program is cached).
    compile_only: compile (and cache on `sd`) the program for this request, run nothing, return None; `sd.params`
    may then be shapes alone (`jax.ShapeDtypeStruct` leaves, e.g. `abstract_params(config)`): see `precompile`.
    warm_up (with compile_only; True, or a callable asked once the program is ready): also run the program once
    on zero weights made on the device, so that its first-run set-up is paid before the real weights arrive."""
    if progress not in PROGRESS:
        raise UserError(f"progress must be one of {PROGRESS}, got {progress!r}")
    step_bar = progress in (True, "steps")
    prompts = as_list(prompts, "prompts")
    n = len(prompts)
    negatives = [""] * n if negative_prompts is None else as_list(negative_prompts, "negative_prompts")
    if len(negatives) == 1 and n > 1:
        negatives = negatives * n
    if len(negatives) != n:
        raise UserError(f"{len(negatives)} negative prompts for {n} prompts")
    check_common(sd, sampler, steps, output, eta, guidance_scale)
    check_mode(sd.config, mode)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise UserError(f"seed must be an integer, got {seed!r}")
    f = sd.latent_factor
    init = mask = None
    if mode in ("img2img", "inpaint"):
        if init_images is None:
            raise UserError(f"{mode} needs an init image")
        init = broadcast_rows(to_unit_range(init_images), n, "init image")
        height, width = init.shape[1:3]
        check_strength(strength)
    height = sd.config.image_size if height is None else height
    width = sd.config.image_size if width is None else width
    check_size(height, width, f)
    if mode == "inpaint":
        mask = mask_rows(masks, n, init.shape[1:3])
    h, w = height // f, width // f
    c = sd.config.unet.out_channels
    if latents is not None:
        raw = np.asarray(latents)
        if raw.dtype.kind not in "fiu" or (raw.size and not np.isfinite(raw).all()):
            raise UserError(f"latents must be a finite real (float) array, got dtype {raw.dtype}"
                            f"{' with NaN/Inf values' if raw.dtype.kind in 'fiu' else ''}")
        latents = broadcast_rows(raw.astype(np.float32), n, "latents")
        if latents.shape[1:] != (h, w, c):
            raise UserError(f"latents must have shape [{n}, {h}, {w}, {c}], got {latents.shape}")
    split = handover(sd, mode, sampler, int(steps), latents is not None, denoising_start, denoising_end)
    scores = None if aesthetic_scores is None else check_aesthetic_scores(sd.config, aesthetic_scores)

    enable_compilation_cache()
    mesh = parallel.data_mesh()
    plan = parallel.plan_batch(n, mesh)
    put = lambda local: parallel.shard_rows(np.stack(local), mesh)  # this process's rows -> global array
    ids = put(sd.tokenize(_pad_rows(prompts, plan)))
    uncond = put(sd.tokenize(_pad_rows(negatives, plan)))
    seeds = put(_seed_rows(seed, plan.local_indices))
    init_x, mask_x, lat_x = (None if a is None else put(_pad_rows(a, plan)) for a in (init, mask, latents))
    loop_steps = samplers.n_loop_steps(sampler, sd.config.schedule.n_steps, int(steps))
    start = samplers.start_step_for_strength(steps, strength, loop_steps) if mode != "txt2img" else split[0]
    end_step = split[1]
    eta_value = samplers.default_eta(sampler) if eta is None else float(eta)
    scalars = parallel.replicate([np.asarray(guidance_scale, np.float32),
                                  np.asarray(0.0 if eta_value is None else eta_value, np.float32),
                                  np.asarray(start, np.int32)], mesh)
    if _is_abstract(sd.params):  # shapes alone: compile for the replicated placement `replicate` gives the weights
        params = parallel.abstract_like(sd.params, parallel.replicated(mesh))
    else:
        params = _cached(sd, ("params", id(mesh)), lambda: parallel.replicate(sd.params, mesh))

    static = dict(mode=mode, sampler=sampler, steps=int(steps), output=output, latent_hw=(h, w),
                  given_latents=latents is not None, progress=_StepBar.step if step_bar else None)
    if end_step is not None:  # only then: the keys of every other program stay as they were
        static["end_step"] = end_step
    if scores is not None:  # likewise
        static["aesthetic_scores"] = scores
    guidance, eta_arg, start_arg = scalars
    args = program_args(params=params, ids=ids, uncond_ids=uncond, seeds=seeds, latents=lat_x, init=init_x,
                        mask=mask_x, guidance=guidance, eta=eta_arg, start_step=start_arg)
    shapes = tuple((a.shape, str(a.dtype)) for a in jax.tree_util.tree_leaves(args[1:7]))
    key = ("program", tuple(sorted((k, v) for k, v in static.items() if k != "progress")), step_bar, shapes)
    t0 = time.perf_counter()
    was_cached = key in sd.cache

    def compile_():
        def lower():
            run = build_program(sd, **static)
            return jax.jit(run, out_shardings=parallel.batch_sharding(mesh)).lower(*args)

        if step_bar:  # a host callback: JAX can neither cache nor serialize the program
            return lower().compile()
        compiled, status = program_cache.load_or_compile(sd, static, args, mesh, lower)
        if timings is not None:
            timings.extra["program_cache"] = status
        return compiled

    if progress and not was_cached:
        print(f"compiling the {mode} program ({sampler}, {steps} steps, batch {plan.padded}, {height}x{width}) ...",
              flush=True)
    _cached(sd, key, compile_)
    t1 = time.perf_counter()
    if compile_only:
        if timings is not None:
            timings.compile, timings.run, timings.cached = t1 - t0, 0.0, was_cached
        if not step_bar and (warm_up() if callable(warm_up) else warm_up):
            weights = parallel.device_zeros(params, parallel.replicated(mesh)) if _is_abstract(sd.params) else params
            _warm_up(sd, key, compile_, (weights,) + args[1:], mode, timings)
        return None
    n_loop = (loop_steps if end_step is None else end_step) - start

    def execute(program):
        with tqdm(total=max(n_loop, 0), desc=mode, unit="step", disable=not step_bar or None, leave=False) as bar:
            _StepBar.active = bar if step_bar else None
            try:
                out = program(*args)
                if progress == "elapsed":
                    _wait_showing_elapsed(out, f"{mode}, {n_loop} steps")
                return parallel.local_rows(out)
            finally:
                _StepBar.active = None

    out = _run_proving(sd, key, compile_, mode, execute)
    t2 = time.perf_counter()
    if timings is not None:
        timings.compile, timings.run, timings.cached = t1 - t0, t2 - t1, was_cached
    return out[plan.local_valid]


def _warm_up(sd, key, compile_, args, mode: str, timings: Timings | None) -> None:
    """Run the program `sd.cache[key]` once on `args` (zero weights) and drop the result. On a GPU the first run
    of an executable in a process pays one-off set-up (kernel loading, cuDNN graphs, CUDA graph capture: 1.1-1.3
    s against 0.39 s later for SD 1.x on an H200), which this moves into the time the weights take to load. A
    stored program that fails here is removed and compiled again, as on a first real run."""
    t = time.perf_counter()
    _run_proving(sd, key, compile_, mode, lambda program: jax.block_until_ready(program(*args)), rerun=False)
    if timings is not None:
        timings.extra["warm_up_s"] = time.perf_counter() - t


def _run_proving(sd, key, compile_, mode: str, run, rerun: bool = True):
    """run(program) with the program `sd.cache[key]`. A program read from the program cache is unproven until
    its first run returns: if that run fails, the stored entry is removed and the program compiled again (and,
    with `rerun`, run again); any other failure is raised."""
    program = sd.cache[key]
    try:
        out = run(program)
    except KeyboardInterrupt:
        program_cache.interrupted(program)
        raise
    except jax.errors.JaxRuntimeError as e:
        if not program_cache.discard(program):  # not a program read from disk on its first run: a real error
            raise
        print(f"warning: the stored {mode} program failed on its first run ({str(e).splitlines()[0]}); "
              "removed it, compiling again", file=sys.stderr, flush=True)
        del sd.cache[key]
        program = _cached(sd, key, compile_)
        out = run(program) if rerun else None
    program_cache.ran(program)
    return out


def txt2img(sd, prompts: str | Sequence[str], *, negative_prompts=None, steps: int = 50, sampler: str = "ddim",
            guidance_scale: float = 7.5, eta: float | None = None, height: int | None = None, width: int | None = None,
            seed: int = 0, latents=None, output: str = "images", progress: bool | str = False,
            timings: Timings | None = None, denoising_start: float | None = None,
            denoising_end: float | None = None, aesthetic_scores: tuple[float, float] | None = None) -> np.ndarray:
    """Text to image. Returns uint8 [B, height, width, 3] (B = len(prompts); height and width default to the
    model's own resolution, `sd.config.image_size`: 512 for SD 1.x), or with output="latents" the
    final latents [B, height/8, width/8, 4] before decoding. `latents` gives x_T explicitly ([B, h, w, 4]).
    eta: None = the sampler's default (0 for DDIM: deterministic; 1 for Euler ancestral).
    Guidance scale, eta and seed never trigger recompilation; steps, batch and size do (then cached).
    SDXL's ensemble of experts (diffusers' `denoising_end` / `denoising_start`): the base runs with
    denoising_end=f and output="latents", then the refiner with the same prompts, sampler, steps and seed,
    denoising_start=f and those latents (`ldm_jax.base_and_refiner`, `ldm-jax txt2img --refiner`).
    aesthetic_scores: the SDXL refiner's (prompt, negative prompt) aesthetic scores, default (6.0, 2.5)."""
    return generate(sd, "txt2img", prompts, negative_prompts=negative_prompts, steps=steps, sampler=sampler,
                    guidance_scale=guidance_scale, eta=eta, height=height, width=width, seed=seed, latents=latents,
                    output=output, progress=progress, timings=timings, denoising_start=denoising_start,
                    denoising_end=denoising_end, aesthetic_scores=aesthetic_scores)


def img2img(sd, prompts: str | Sequence[str], init_images, *, strength: float = 0.75, negative_prompts=None,
            steps: int = 50, sampler: str = "ddim", guidance_scale: float = 7.5, eta: float | None = None,
            seed: int = 0, latents=None, output: str = "images", progress: bool | str = False,
            timings: Timings | None = None, aesthetic_scores: tuple[float, float] | None = None) -> np.ndarray:
    """Image to image (SDEdit, Meng et al. 2022): the init image's latents are noised to the level of step
    steps - int(strength * steps) and denoised from there. init_images: uint8 [H, W, 3] / [B, H, W, 3] or
    float in [-1, 1]; H, W multiples of 8. strength 0 returns the (VAE round-tripped) init image.
    aesthetic_scores: the SDXL refiner's (see `txt2img`)."""
    return generate(sd, "img2img", prompts, init_images=init_images, strength=strength,
                    negative_prompts=negative_prompts, steps=steps, sampler=sampler, guidance_scale=guidance_scale,
                    eta=eta, seed=seed, latents=latents, output=output, progress=progress, timings=timings,
                    aesthetic_scores=aesthetic_scores)


def inpaint(sd, prompts: str | Sequence[str], init_images, masks, *, strength: float = 1.0, negative_prompts=None,
            steps: int = 50, sampler: str = "ddim", guidance_scale: float = 7.5, eta: float | None = None,
            seed: int = 0, latents=None, output: str = "images", progress: bool | str = False,
            timings: Timings | None = None, aesthetic_scores: tuple[float, float] | None = None) -> np.ndarray:
    """Repaint where `masks` is white (1), keep the rest. With an ordinary U-Net: mask-blend painting (the
    known region is re-noised to each step's level and pasted in, as labml/CompVis); with the 9-channel
    inpainting U-Net: its mask and masked-image conditioning. Pixels outside the mask are the original's."""
    return generate(sd, "inpaint", prompts, init_images=init_images, masks=masks, strength=strength,
                    negative_prompts=negative_prompts, steps=steps, sampler=sampler, guidance_scale=guidance_scale,
                    eta=eta, seed=seed, latents=latents, output=output, progress=progress, timings=timings,
                    aesthetic_scores=aesthetic_scores)


def precompile(sd, mode: str, prompts, warm_up=False, **request) -> Timings:
    """Compile the program that `generate(sd, mode, prompts, **request)` would run, without running it, and keep
    it on `sd`. `sd` may hold parameter shapes alone, so a program can compile while the weights load
    (`warm_start.load_while_compiling`); `adopt_programs` hands it to the loaded model. warm_up: see `generate`.
    Returns the timings."""
    timings = Timings()
    generate(sd, mode, prompts, **request, timings=timings, compile_only=True, warm_up=warm_up)
    return timings


def adopt_programs(dst, src) -> bool:
    """Give `dst` the compiled programs of `src` when they were built for the same model: same config, compute
    dtype, attention implementation, and parameters of the same tree, shapes and dtypes. Returns whether it did."""
    def avals(params):
        leaves, tree = jax.tree_util.tree_flatten(params)
        return tree, [(tuple(x.shape), np.dtype(x.dtype)) for x in leaves]

    same = (dst.config == src.config and np.dtype(dst.dtype) == np.dtype(src.dtype)
            and dst.attention_impl == src.attention_impl and avals(dst.params) == avals(src.params))
    if same:
        dst.cache.update({k: v for k, v in src.cache.items() if k[0] == "program"})
    return same
