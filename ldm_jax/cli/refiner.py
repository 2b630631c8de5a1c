"""`ldm-jax txt2img --refiner FILE [--refiner-switch F]`: SDXL's base model samples the first F of the schedule and
hands its latents to the refiner, which samples the rest and decodes (`ldm_jax.pipelines.refine`).

The base's program is the warm-started txt2img program with `denoising_end` (it compiles while the base loads);
the refiner loads after the base has sampled, with the same --vae (its autoencoder decodes) and --embedding files
(an SDXL embedding lends it its clip_g, so the word means the same to both), and no --lora (LoRAs fit one model).
"""

from __future__ import annotations

import os
import time

from ldm_jax.errors import UserError


def add_score_arguments(p) -> None:
    p.add_argument("--aesthetic-score", type=float, metavar="S", help="SDXL refiner: the aesthetic score its "
                   "conditioning gets with the prompt (default: 6.0, as sgm and diffusers)")
    p.add_argument("--negative-aesthetic-score", type=float, metavar="S", help="SDXL refiner: the score with the "
                   "negative prompt (default: 2.5)")


def scores(args):
    """(prompt, negative prompt) aesthetic scores if either flag was given, else None (the defaults)."""
    from ldm_jax.conditioning import AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE

    if args.aesthetic_score is None and args.negative_aesthetic_score is None:
        return None
    return (AESTHETIC_SCORE if args.aesthetic_score is None else args.aesthetic_score,
            NEGATIVE_AESTHETIC_SCORE if args.negative_aesthetic_score is None else args.negative_aesthetic_score)


def add_arguments(p) -> None:
    p.add_argument("--refiner", metavar="FILE", help="SDXL: hand the end of sampling to the SDXL refiner "
                   "(sd_xl_refiner_1.0.safetensors or a converted directory): the base model (--checkpoint) runs the "
                   "first --refiner-switch of the schedule and the refiner the rest, with the same prompts, sampler, "
                   "steps and seed (diffusers' ensemble of expert denoisers); the refiner's autoencoder decodes")
    p.add_argument("--refiner-switch", type=float, default=None, metavar="F", help="with --refiner: the fraction "
                   "of the schedule the base model runs (default: 0.8, as diffusers' guide; A1111's 'switch at')")


def check(args, base_config) -> tuple:
    """(hand-over fraction, the refiner's declared config or None) of a --refiner request ((None, None) without one),
    checked before anything loads: the fraction, the refiner file's architecture where it declares it, and the
    base's where known (`check_base`)."""
    switch = getattr(args, "refiner_switch", None)
    if getattr(args, "refiner", None) is None:
        if switch is not None:
            raise UserError("--refiner-switch needs --refiner FILE (the SDXL refiner to hand over to)")
        return None, None
    from ldm_jax.pipelines.refine import HANDOVER
    from ldm_jax.warm_start import peek_config

    switch = HANDOVER if switch is None else switch
    if not 0.0 < switch < 1.0:
        raise UserError(f"--refiner-switch must be in (0, 1), got {switch}")
    if not os.path.exists(args.refiner):
        raise UserError(f"--refiner {args.refiner}: no such file or directory")
    refiner_config = peek_config(args.refiner)
    if refiner_config is not None and not refiner_config.is_sdxl_refiner:
        raise UserError(f"--refiner {args.refiner}: a {refiner_config.name} model, not the SDXL refiner")
    if base_config is not None:
        check_base(base_config)
    return switch, refiner_config


def check_base(base_config) -> None:
    """--checkpoint must be an SDXL base model (`refine.is_sdxl_base`): one line otherwise."""
    from ldm_jax.pipelines.refine import is_sdxl_base

    if not is_sdxl_base(base_config):
        raise UserError(f"--refiner takes over from an SDXL base model; --checkpoint is a {base_config.name} model")


def refine(args, base, prompts, handed, request: dict, embeddings, progress, aesthetic_scores) -> tuple:
    """Load the refiner and sample the rest of the schedule from the base's latents `handed`; returns (images,
    refiner model, its Timings)."""
    import ldm_jax
    from ldm_jax.pipelines.generate import Timings, generate
    from ldm_jax.pipelines.refine import check_pair

    t0 = time.perf_counter()
    print(f"loading the refiner {args.refiner} ...", flush=True)
    refiner = ldm_jax.load(args.refiner, dtype=args.dtype, progress=True, vae=args.vae, embeddings=embeddings)
    print(f"loaded {refiner.config.name} in {time.perf_counter() - t0:.1f}s", flush=True)
    check_pair(base, refiner)
    timings = Timings()
    rest = {k: v for k, v in request.items() if k not in ("denoising_end", "output")}
    images = generate(refiner, "txt2img", prompts, progress=progress, timings=timings, latents=handed,
                      denoising_start=request["denoising_end"], aesthetic_scores=aesthetic_scores, **rest)
    return images, refiner, timings
