"""`ldm-jax txt2img | img2img | inpaint`: generate images and save them as PNGs with their parameters.

Each image is saved as OUT/<seed>-<index>.png with the prompt, negative prompt, seed, sampler, steps, scale
(and strength) in PNG text chunks; with --n > 1 a grid image is saved too. Progress is shown for loading,
compiling, and sampling: every step (--step-progress) or the elapsed time. Multi-host: set
LDM_JAX_COORDINATOR, LDM_JAX_NUM_PROCESSES and LDM_JAX_PROCESS_ID (or --coordinator/--num-processes/--process-id);
each host saves its own share. Compiled programs are kept in LDM_JAX_CACHE_DIR (default ~/.cache/ldm-jax/xla), so a
new process with the same model, request shape and code skips tracing and compiling (LDM_JAX_NO_PROGRAM_CACHE=1
keeps JAX's compilation cache alone; LDM_JAX_NO_COMPILE_CACHE=1 turns both off).
"""

from __future__ import annotations

import argparse
import os
import re
import time

from ldm_jax.errors import UserError

SAMPLER_NAMES = ("ddim", "ddpm", "plms", "dpmpp_2m", "euler_a")
STEP_BAR_MIN_UNET_PARAMS = 100_000_000  # SD 1.x/2.x U-Nets have ~860M; the bundled shapes model 4.6M


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="CompVis .ckpt/.safetensors or a converted directory (default: the small "
                   "bundled model of coloured shapes, 64x64)")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (default: none)")
    p.add_argument("--n", type=int, default=1, help="number of images (default: 1)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default: 50)")
    p.add_argument("--sampler", default="ddim", choices=SAMPLER_NAMES, help="sampler (default: ddim)")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    p.add_argument("--eta", type=float, default=None, help="DDIM/Euler-a noise (default: the sampler's own)")
    p.add_argument("--seed", type=int, default=0, help="random seed; image i uses fold_in(seed, i) (default: 0)")
    if name == "txt2img":
        p.add_argument("--height", type=int, help="image height, a multiple of 8 (default: the model's own, 512 "
                       "for SD 1.x)")
        p.add_argument("--width", type=int, help="image width, a multiple of 8 (default: the model's own)")
    else:
        p.add_argument("--init", required=True, metavar="IMG", help="init image (its size must be a multiple of 8)")
        p.add_argument("--strength", type=float, default=0.75 if name == "img2img" else 1.0,
                       help="how much to change the init image, 0..1 (default: %(default)s)")
    if name == "inpaint":
        p.add_argument("--mask", required=True, metavar="IMG", help="mask image: white = repaint, black = keep")
    p.add_argument("--out", default=f"outputs/{name}", metavar="DIR", help="output directory (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: float32; bfloat16 is faster on GPU/TPU)")
    p.add_argument("--step-progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar advanced by every sampling step. Its callback from inside the compiled "
                   "loop keeps the program out of the persistent compilation cache, so every run compiles it "
                   "again; without it the elapsed time is shown and a new process reuses the compiled program. "
                   "Default: on for SD-sized models on a CPU (seconds per step), off otherwise (GPU/TPU, small "
                   "models)")
    p.add_argument("--coordinator", help="multi-host: coordinator address host:port")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help="multi-host: this process's id")
    p.set_defaults(func=run, mode=name)


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:limit] or "image"


# how the program was obtained (`program_cache.load_or_compile`), as a suffix of the timing lines
_PROGRAM_SOURCE = {"hit": ", read from the program cache", "stored": ", compiled and saved to the program cache"}


def _step_bar(args, unet_params) -> bool:
    """--step-progress, or by default: per-step bars only where a step is slow enough to watch and compiling is
    cheap by comparison (SD-sized U-Nets on a CPU). `unet_params`: the U-Net's parameters, or their shapes."""
    if args.step_progress is not None:
        return args.step_progress
    import jax

    unet = sum(x.size for x in jax.tree_util.tree_leaves(unet_params))
    return jax.default_backend() == "cpu" and unet >= STEP_BAR_MIN_UNET_PARAMS


def run(args) -> int:
    from ldm_jax.pipelines.generate import Timings, check_size, check_steps, check_strength, generate

    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    check_steps(args.steps)  # fail before loading gigabytes; generate() checks again with the model's factor
    if args.mode == "txt2img":
        check_size(8 if args.height is None else args.height, 8 if args.width is None else args.width)
    else:
        check_strength(args.strength)
    if args.eta is not None and args.eta < 0:
        raise UserError(f"--eta must be >= 0, got {args.eta}")
    from ldm_jax import images as imio
    from ldm_jax import parallel

    multi = parallel.init_distributed(args.coordinator, args.num_processes, args.process_id)
    import ldm_jax
    from ldm_jax.loading import DEFAULT_MODEL
    from ldm_jax.models.build import abstract_params
    from ldm_jax.warm_start import load_while_compiling, peek_config

    kw = {}
    if args.mode != "txt2img":
        init = imio.read_image(args.init)
        kw.update(init_images=init, strength=args.strength)
        if args.mode == "inpaint":
            kw.update(masks=imio.read_mask(args.mask))
            if kw["masks"].shape != init.shape[:2]:
                raise UserError(f"the mask is {kw['masks'].shape[0]}x{kw['masks'].shape[1]} but the image is "
                                f"{init.shape[0]}x{init.shape[1]}")
    if args.mode == "txt2img":
        kw.update(height=args.height, width=args.width)  # None: the model's own size
    request = dict(negative_prompts=[args.negative_prompt] * args.n, steps=args.steps, sampler=args.sampler,
                   guidance_scale=args.scale, eta=args.eta, seed=args.seed, **kw)
    prompts = [args.prompt] * args.n
    name = args.checkpoint or "the bundled model"
    config = peek_config(args.checkpoint)  # known before reading tensors: compile while they load
    t0 = time.perf_counter()
    if config is None:
        print(f"loading {name} ...", flush=True)
        sd = ldm_jax.load(args.checkpoint, dtype=args.dtype, progress=True)
        ahead = None
        print(f"loaded {sd.config.name} in {time.perf_counter() - t0:.1f}s", flush=True)
    # the loaded weights, else the shapes the warm start compiles against (cached per config: no extra work)
    unet = (sd.params if config is None else abstract_params(config))["unet"]
    progress = "steps" if _step_bar(args, unet) else "elapsed"
    if config is not None:
        print(f"loading {name} while compiling the {args.mode} program ...", flush=True)
        sd, ahead = load_while_compiling(args.checkpoint, args.mode, prompts, dtype=args.dtype, progress=progress,
                                         load_kwargs={"progress": True}, **request)
        print(f"loaded {sd.config.name} in {ahead.extra['load_s']:.1f}s; program ready in {ahead.compile:.1f}s"
              f"{_PROGRAM_SOURCE.get(ahead.extra.get('program_cache'), '')} "
              f"(both done after {time.perf_counter() - t0:.1f}s)", flush=True)
    timings = Timings()
    images = generate(sd, args.mode, prompts, progress=progress, timings=timings, **request)
    compile_s = timings.compile + (ahead.compile if ahead is not None else 0.0)
    print(f"sampled {args.n} image(s) in {timings.run:.1f}s (compile {compile_s:.1f}s"
          f"{_PROGRAM_SOURCE.get(timings.extra.get('program_cache'), '')})", flush=True)
    os.makedirs(args.out, exist_ok=True)
    meta = {"prompt": args.prompt, "negative_prompt": args.negative_prompt or None, "seed": args.seed,
            "sampler": args.sampler, "steps": args.steps, "scale": args.scale, "eta": args.eta,
            "mode": args.mode, "strength": getattr(args, "strength", None),
            "checkpoint": os.path.basename(os.path.normpath(args.checkpoint or DEFAULT_MODEL)),
            "generator": "ldm-jax"}
    plan = parallel.plan_batch(args.n)
    indices = [i for i in plan.local_indices if i < args.n]
    for i, image in zip(indices, images):
        path = os.path.join(args.out, f"{args.seed}-{i:04d}-{_slug(args.prompt)}.png")
        imio.save_png(path, image, dict(meta, index=i))
        print(f"saved {path}")
    if args.n > 1 and not multi:
        path = os.path.join(args.out, f"{args.seed}-grid-{_slug(args.prompt)}.png")
        imio.save_png(path, imio.grid(images), meta)
        print(f"saved {path}")
    return 0
