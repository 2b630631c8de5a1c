"""`ldm-jax txt2img | img2img | inpaint`: generate images and save them as PNGs with their parameters.

Each image is saved as OUT/<seed>-<index>-<prompt>.png (index in 4 digits, the prompt's letters and digits with
_ between words, at most 40 characters: 7-0000-a_red_circle.png) with the prompt, negative prompt, seed, sampler,
steps, scale (and strength) in PNG text chunks; with --n > 1 a grid is saved too, as OUT/<seed>-grid-<prompt>.png.
Nothing is ever overwritten: when any of a run's names is taken (by an earlier run into the same --out), all the
run's files get the same suffix, the first free of -2, -3, ... (7-0000-a_red_circle-2.png). Progress is shown
for loading, compiling, and sampling: every step (--step-progress) or the elapsed time. Multi-host: set
LDM_JAX_COORDINATOR, LDM_JAX_NUM_PROCESSES and LDM_JAX_PROCESS_ID (or --coordinator/--num-processes/--process-id);
each host saves its own share. --vae FILE swaps in a fine-tuned autoencoder (CompVis layout, e.g.
vae-ft-mse-840000-ema-pruned.safetensors) while the program compiles; its file name goes into the PNG text.
--lora FILE[:SCALE] (repeatable) merges a kohya-ss LoRA/LoCon into the weights (scale default 1.0), likewise.
--embedding FILE[:TOKEN] (repeatable) makes the prompt word TOKEN (default: the file's base name, as A1111) stand
for a textual-inversion embedding's vectors (A1111 .pt/.safetensors, diffusers learned_embeds), likewise.
txt2img --refiner FILE [--refiner-switch F]: SDXL's base samples the first F (0.8) of the schedule, the SDXL
refiner the rest (`ldm_jax.cli.refiner`); the PNG text names the refiner and F.
Compiled programs are kept in LDM_JAX_CACHE_DIR (default ~/.cache/ldm-jax/xla), so a new process with the same
model, request shape and code skips tracing and compiling (LDM_JAX_NO_PROGRAM_CACHE=1 keeps JAX's compilation
cache alone; LDM_JAX_NO_COMPILE_CACHE=1 turns both off).

--from-file FILE (instead of --prompt, as CompVis' scripts/txt2img.py): one prompt a line, UTF-8 (a BOM, CRLF
and blank lines are fine; spaces around a line are dropped). Every prompt gets --n images and all of them are one
batch, compiled once (memory grows with prompts x --n as with --n alone: split a file that runs out). Image k of
prompt p (both from 0, blank lines not counted) is image i = p * n + k of the run: seeded fold_in(seed, i), saved
as OUT/<seed>-<i>-<its own prompt>.png with its own prompt in the PNG text, so `--prompt "THAT LINE" --seed SEED
--n N` with N > i draws it again as its image i (bit for bit with N = prompts x n, the same batch size; another
batch size may move a pixel value by 1 in rounding). The grid, OUT/<seed>-grid-<file name>.png, has a row per
prompt (with --n 1: a square grid in file order) and all the prompts, one a line, in its PNG text.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time

from ldm_jax.cli import refiner as refiner_cli
from ldm_jax.cli.prompts import prompt_lines, warn_if_truncated
from ldm_jax.errors import UserError

SAMPLER_NAMES = ("ddim", "ddpm", "plms", "dpmpp_2m", "euler_a")
STEP_BAR_MIN_UNET_PARAMS = 100_000_000  # SD 1.x/2.x U-Nets have ~860M; the bundled shapes model 4.6M


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="CompVis .ckpt/.safetensors or a converted directory (default: the small "
                   "bundled model of coloured shapes, 64x64)")
    p.add_argument("--vae", metavar="FILE", help="replace the model's autoencoder with a standalone CompVis-layout VAE "
                   "file (.safetensors/.ckpt, e.g. vae-ft-mse-840000-ema-pruned.safetensors; its name goes into the "
                   "PNG text)")
    from convert.lora import lora_arg  # numpy: imported when the parser is built, not by `import ldm_jax.cli`

    p.add_argument("--lora", metavar="FILE[:SCALE]", action="append", type=lora_arg, help="merge a kohya-ss "
                   "LoRA/LoCon or LyCORIS (LoHa/LoKr) file (lora_unet_*/lora_te_*; SDXL: lora_te1_*/lora_te2_*) into "
                   "the weights with SCALE (default 1.0); repeatable; the files and scales go into the PNG text")
    from convert.embeddings import embedding_arg

    p.add_argument("--embedding", metavar="FILE[:TOKEN]", action="append", type=embedding_arg, help="a "
                   "textual-inversion embedding (A1111 .pt/.safetensors, diffusers learned_embeds; SDXL: clip_l + "
                   "clip_g): the prompt word TOKEN (default: the file's base name) stands for its vectors; repeatable; "
                   "named in the PNG text")
    p.add_argument("--prediction", choices=("eps", "v"), help="what the U-Net predicts, instead of what the "
                   "checkpoint says or (SD 2.x files, which do not say) what its weights suggest: the 768x768 SD 2.x "
                   "models predict v, the 512x512 ones eps (default: the checkpoint's)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="text prompt")
    source.add_argument("--from-file", metavar="FILE", help="a UTF-8 text file of prompts, one a line (blank lines "
                        "skipped), each given --n images in one batch: image k of prompt p is image p * n + k of "
                        "the run (see above)")
    p.add_argument("--negative-prompt", default="", help="what to steer away from, for every prompt (default: "
                   "none)")
    p.add_argument("--n", type=int, default=1, help="number of images (of each prompt of --from-file) (default: 1)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default: 50). DDIM and PLMS use "
                   "CompVis' time steps range(0, T, T // STEPS) + 1 (T = 1000 for SD 1.x and the bundled model): "
                   "a count that does not divide T runs a few more steps (30 runs 31) and counts whose last time "
                   "step would pass T are refused (for T = 1000: 3, 9, 27, 36, 37, 101-111, 251-333, over 500)")
    p.add_argument("--sampler", default="ddim", choices=SAMPLER_NAMES, help="sampler (default: ddim)")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    p.add_argument("--eta", type=float, default=None, help="DDIM/Euler-a noise (default: the sampler's own)")
    refiner_cli.add_score_arguments(p)
    p.add_argument("--seed", type=int, default=0,
                   help="random seed, an integer in [0, 2^32); image i uses fold_in(seed, i) (default: 0)")
    if name == "txt2img":
        p.add_argument("--height", type=int, help="image height, a multiple of 8 (default: the model's own, 512 "
                       "for SD 1.x)")
        p.add_argument("--width", type=int, help="image width, a multiple of 8 (default: the model's own)")
        refiner_cli.add_arguments(p)
    else:
        p.add_argument("--init", required=True, metavar="IMG",
                       help="init image: its width and height must be multiples of 8; transparency is laid on "
                       "white, 16-bit grayscale is scaled to 8 bits and float grayscale in [0, 1] (32-bit TIFF) to "
                       "0..255; an animation's first frame is used")
        p.add_argument("--strength", type=float, default=0.75 if name == "img2img" else 1.0,
                       help="how much to change the init image, 0..1 (default: %(default)s)")
    if name == "inpaint":
        p.add_argument("--mask", required=True, metavar="IMG",
                       help="mask image, the init image's size: white = repaint, black = keep, thresholded at 50%% "
                       "gray (the mean of R, G, B; as CompVis and diffusers); a mask with transparency is laid on "
                       "black, so transparent areas are kept")
    p.add_argument("--out", default=f"outputs/{name}", metavar="DIR",
                   help="output directory, created if missing; existing files in it are never overwritten "
                   "(default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: float32; bfloat16 is faster on GPU/TPU; float16 needs a GPU/TPU: "
                   "XLA's CPU backend cannot run it)")
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


SEED_LIMIT = 2**32  # the program keys on the seed as a uint32: larger or negative seeds would alias smaller ones


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:limit] or "image"


def check_out(out: str) -> None:
    """--out must be a directory that exists or can be created, and is writable: checked before anything is loaded
    or sampled (nothing is created here; the directory is made only when there are images to save)."""
    from ldm_jax.output_dirs import check_can_write_dir

    if not out:
        raise UserError("--out must name a directory, got an empty string")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out}: exists and is not a directory")
    check_can_write_dir(out, f"--out {out}")


def _check_init_size(path: str, shape, factor: int) -> None:
    """img2img/inpaint: the init image's sides must be multiples of max(8, the autoencoder's factor)."""
    f = max(8, factor)
    h, w = shape[:2]
    if h % f or w % f:
        raise UserError(f"{path}: the image is {w} wide and {h} high; img2img and inpaint need both to be multiples "
                        f"of {f} (crop or resize it)")


def _read_mask(args, hw):
    """--mask, the init image's size (both named as width x height, as image tools do); an all-black mask (nothing
    to repaint: the output would be the init image) gets a warning."""
    from ldm_jax import images as imio

    mask = imio.read_mask(args.mask)
    if mask.shape != tuple(hw):
        raise UserError(f"{args.mask}: the mask is {mask.shape[1]}x{mask.shape[0]} (width x height) but the image is "
                        f"{hw[1]}x{hw[0]}; they must be the same size")
    if not (mask >= 0.5).any():
        print(f"warning: {args.mask}: the mask is black everywhere (below 50% gray), so nothing is repainted: the "
              "output is the init image", file=sys.stderr, flush=True)
    return mask


@contextlib.contextmanager
def _out_of_memory_as_one_line(args, request, n_prompts: int = 1):
    """XLA's RESOURCE_EXHAUSTED while compiling or sampling (a huge init image or --height/--width, a large --n) ->
    one line naming the request and what to lower, not a traceback."""
    import jax

    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        init = request.get("init_images")
        if init is not None:
            size, hint = f"{init.shape[1]}x{init.shape[0]}", "lower --n or use a smaller --init image"
        else:
            size = f"{args.width or 'default'}x{args.height or 'default'}"
            hint = "lower --n or --height/--width"
        if args.from_file is not None:  # all prompts x --n images are one batch
            hint = hint.replace("lower --n", "use fewer prompts in --from-file, lower --n")
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"out of memory for {args.n * n_prompts} {size} image(s): {detail}; {hint}") from None


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
    from ldm_jax.pipelines.generate import Timings, check_mode, check_size, check_steps, check_strength, generate
    from ldm_jax.pipelines.requests import check_aesthetic_scores

    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    labelled = prompt_lines(args)  # a bad --from-file fails here, before anything is loaded
    texts = [text for _, text in labelled]
    total = len(texts) * args.n  # image i = p * n + k is image k of prompt p: one batch, seeds fold_in(seed, i)
    check_steps(args.steps)  # fail before loading gigabytes; generate() checks again with the model's factor
    if args.mode == "txt2img":
        check_size(8 if args.height is None else args.height, 8 if args.width is None else args.width)
    else:
        check_strength(args.strength)
    if args.eta is not None and args.eta < 0:
        raise UserError(f"--eta must be >= 0, got {args.eta}")
    if not 0 <= args.seed < SEED_LIMIT:
        raise UserError(f"--seed must be in [0, 2^32) = [0, {SEED_LIMIT - 1}], got {args.seed}")
    check_out(args.out)
    from ldm_jax import images as imio
    from ldm_jax import parallel

    multi = parallel.init_distributed(args.coordinator, args.num_processes, args.process_id,
                                      log=lambda m: print(m, flush=True))
    if multi and getattr(args, "refiner", None) is not None:
        raise UserError("--refiner runs on one host (multi-host: not supported yet)")
    if multi:
        from ldm_jax.cli.same_request import check_same_request

        check_same_request(args, texts)
    import jax

    if args.dtype == "float16" and jax.default_backend() == "cpu":  # XLA: "F16_F16_F32 not supported on CPU"
        raise UserError("--dtype float16 cannot run on the CPU backend (XLA's CPU matmul has no float16 precision); "
                        "use --dtype float32 or bfloat16")
    import ldm_jax
    from ldm_jax.loading import DEFAULT_MODEL
    from ldm_jax.models.build import abstract_params
    from ldm_jax.samplers import n_loop_steps
    from ldm_jax.warm_start import load_while_compiling, peek_config

    config = peek_config(args.checkpoint)  # known before reading tensors: compile while they load
    if args.vae is not None:  # a missing, unreadable or misfitting VAE file fails before anything slow
        from convert.vae_file import check_vae_file

        check_vae_file(args.vae, config)
    from convert.embeddings import check_embeddings, describe_embeddings
    from convert.lora import check_lora_file, describe_merged

    for lora, _ in args.lora or []:  # likewise a LoRA that is missing, not kohya's, or (config known) misfits
        check_lora_file(lora, config)
    embeddings = check_embeddings(args.embedding, config)  # and embeddings (read once: they are small)
    if config is not None:  # the sampler's time-step table (DDIM/PLMS cannot do 3 steps of T=1000), before loading
        check_mode(config, args.mode)
        try:
            n_loop_steps(args.sampler, config.schedule.n_steps, args.steps)
        except ValueError as e:
            raise UserError(str(e)) from None
    (switch, refiner_config), scores = refiner_cli.check(args, config), refiner_cli.scores(args)
    scored = config if switch is None else refiner_config  # the model the scores go to
    if scores is not None and scored is not None:  # else checked once it is loaded
        check_aesthetic_scores(scored, scores)
    warn_if_truncated(args, labelled, 77 if config is None else config.text.max_length, embeddings)
    kw = {}
    if args.mode != "txt2img":
        init = imio.read_image(args.init)
        _check_init_size(args.init, init.shape, 8 if config is None else config.vae.downsample_factor)
        kw.update(init_images=init, strength=args.strength)
        if args.mode == "inpaint":
            kw.update(masks=_read_mask(args, init.shape[:2]))
    if args.mode == "txt2img":
        kw.update(height=args.height, width=args.width)  # None: the model's own size
    if switch is not None:  # the base stops there and hands its latents over (`refiner_cli.refine`)
        kw.update(denoising_end=switch, output="latents")
    elif scores is not None:
        kw.update(aesthetic_scores=scores)
    request = dict(negative_prompts=[args.negative_prompt] * total, steps=args.steps, sampler=args.sampler,
                   guidance_scale=args.scale, eta=args.eta, seed=args.seed, **kw)
    prompts = [text for text in texts for _ in range(args.n)]  # row i = p * n + k
    name = args.checkpoint or "the bundled model"
    t0 = time.perf_counter()
    if config is None:
        print(f"loading {name} ...", flush=True)
        sd = ldm_jax.load(args.checkpoint, dtype=args.dtype, progress=True, vae=args.vae, loras=args.lora,
                          prediction=args.prediction, embeddings=embeddings)
        ahead = None
        print(f"loaded {sd.config.name} in {time.perf_counter() - t0:.1f}s", flush=True)
    # the loaded weights, else the shapes the warm start compiles against (cached per config: no extra work)
    unet = (sd.params if config is None else abstract_params(config))["unet"]
    progress = "steps" if _step_bar(args, unet) else "elapsed"
    if config is not None:
        print(f"loading {name} while compiling the {args.mode} program ...", flush=True)
        with _out_of_memory_as_one_line(args, request, len(texts)):
            sd, ahead = load_while_compiling(args.checkpoint, args.mode, prompts, dtype=args.dtype, progress=progress,
                                             load_kwargs={"progress": True, "vae": args.vae, "loras": args.lora,
                                                          "prediction": args.prediction, "embeddings": embeddings},
                                             **request)
        print(f"loaded {sd.config.name} in {ahead.extra['load_s']:.1f}s; program ready in {ahead.compile:.1f}s"
              f"{_PROGRAM_SOURCE.get(ahead.extra.get('program_cache'), '')} "
              f"(both done after {time.perf_counter() - t0:.1f}s)", flush=True)
    if switch is not None:
        refiner_cli.check_base(sd.config)  # a base whose kind its file did not declare
    timings = Timings()
    with _out_of_memory_as_one_line(args, request, len(texts)):
        images = generate(sd, args.mode, prompts, progress=progress, timings=timings, **request)
        base = sd
        if switch is not None:
            images, sd, second = refiner_cli.refine(args, base, prompts, images, request, embeddings, progress,
                                                    scores)
            timings.run, timings.compile = timings.run + second.run, timings.compile + second.compile
    compile_s = timings.compile + (ahead.compile if ahead is not None else 0.0)
    print(f"sampled {total} image(s) in {timings.run:.1f}s (compile {compile_s:.1f}s"
          f"{_PROGRAM_SOURCE.get(timings.extra.get('program_cache'), '')})", flush=True)
    os.makedirs(args.out, exist_ok=True)
    meta = {"prompt": args.prompt, "negative_prompt": args.negative_prompt or None, "seed": args.seed,
            "sampler": args.sampler, "steps": args.steps, "scale": args.scale, "eta": args.eta,
            "mode": args.mode, "strength": getattr(args, "strength", None),
            "checkpoint": os.path.basename(os.path.normpath(args.checkpoint or DEFAULT_MODEL)),
            "model": base.config.name, "prediction": base.config.schedule.prediction,
            "vae": os.path.basename(args.vae) if args.vae else sd.metadata.get("vae"), "dtype": args.dtype,
            "loras": describe_merged(base.metadata), "embeddings": describe_embeddings(sd.metadata),
            "refiner": os.path.basename(os.path.normpath(args.refiner)) if switch is not None else None,
            "refiner_switch": switch, "aesthetic_scores": None if scores is None else f"{scores[0]}, {scores[1]}",
            "generator": "ldm-jax"}
    plan = parallel.plan_batch(total)
    indices = [i for i in plan.local_indices if i < total]
    for path in _save(args, meta, prompts, indices, images, multi):
        print(f"saved {path}")
    return 0


def _save(args, meta: dict, prompts: list[str], indices, images, multi: bool) -> list[str]:
    """Save this process's images (and the grid) under names no earlier run has taken, one run number for all
    the run's files (`images.save_new_pngs`); multi-host, process 0 picks it for every host. `prompts`: every
    image's own prompt (all the run's images); each file is named after, and its PNG text holds, its own."""
    from ldm_jax import images as imio

    stem = lambda i: f"{args.seed}-{i:04d}-{_slug(prompts[i])}"  # noqa: E731
    items = [(stem(i), image, dict(meta, prompt=prompts[i], index=int(i))) for i, image in zip(indices, images)]
    if len(prompts) > 1 and not multi:
        if args.from_file is None:
            items.append((f"{args.seed}-grid-{_slug(args.prompt)}", imio.grid(images), dict(meta, prompt=args.prompt)))
        else:  # a row per prompt (--n 1: a square grid in file order); its text: the prompts, one a line
            name = _slug(os.path.splitext(os.path.basename(args.from_file))[0])
            items.append((f"{args.seed}-grid-{name}", imio.grid(images, cols=args.n if args.n > 1 else None),
                          dict(meta, prompt="\n".join(prompts[::args.n]))))
    run = 1
    if multi:  # every host starts from the run number that is free for all n names (on a shared --out)
        from ldm_jax import parallel

        names = [stem(i) for i in range(len(prompts))]  # process 0 saves without waiting
        run = int(parallel.from_process_0("output run number", lambda: str(imio.first_free_run(args.out, names))))
    return imio.save_new_pngs(args.out, items, run=run)
