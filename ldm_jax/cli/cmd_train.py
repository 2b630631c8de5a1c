"""`ldm-jax train`: fine-tune (or train from scratch) the latent U-Net on a folder of captioned images.

    ldm-jax train --checkpoint sd-v1-5.safetensors --data pokemon/ --out runs/pokemon --steps 15000 \\
        --batch-size 8 --lr 1e-5 --precision bf16 --sample-every 1000 --sample-prompt "a green pokemon"
    ldm-jax train --preset tiny --data shapes/ --out runs/tiny --resolution 16 --steps 500 --lr 1e-3
    ldm-jax train ... --resume                       # continue RUN_DIR exactly where its last checkpoint stopped
    ldm-jax train --export-only --out RUN_DIR --checkpoint BASE   # write RUN_DIR/model from the latest checkpoint
    ldm-jax train --checkpoint sd-v1-5.safetensors --data pets/ --out runs/pets --lora-rank 16 --lr 1e-4
                                                     # a LoRA: RUN_DIR/lora.safetensors (use with --lora FILE)

The data folder holds `name.png` + `name.txt` pairs or a Hugging Face `metadata.jsonl` (file_name, text). Writes
RUN_DIR/checkpoints (orbax; every --save-every steps, last --keep kept), metrics.jsonl, samples/ and at the end
RUN_DIR/model, a converted directory (`ldm_jax.load`, `ldm-jax export RUN_DIR/model out.safetensors`). The VAE
stays frozen; the text encoder too, unless --train-text-encoder; with --lora-rank the U-Net too (a LoRA on it
trains). --batch-size is the global batch over all devices and hosts; one update averages --grad-accum batches.
Multi-host: LDM_JAX_COORDINATOR / LDM_JAX_NUM_PROCESSES / LDM_JAX_PROCESS_ID (or the flags).
"""

from __future__ import annotations

import argparse

from ldm_jax.errors import UserError
from ldm_jax.train import limits


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    base = p.add_mutually_exclusive_group()
    base.add_argument("--checkpoint", metavar="BASE", help="starting model: .ckpt/.safetensors or converted directory "
                      "(default: the bundled shapes model, as every ldm-jax command)")
    base.add_argument("--preset", help="start from random weights of a preset (e.g. tiny) instead")
    p.add_argument("--prediction", choices=("eps", "v"), help="what the U-Net learns to predict, instead of what "
                   "the base model says or (SD 2.x files, which do not say) what its weights suggest: the 768x768 SD "
                   "2.x models predict v, the 512x512 ones eps (default: the base's; --resume and --export-only: "
                   "the run's)")
    p.add_argument("--data", metavar="DIR", help="folder of captioned images")
    p.add_argument("--out", metavar="RUN_DIR", required=True, help="run directory")
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps in total (default: 1000)")
    p.add_argument("--batch-size", type=int, default=1, help="global batch per micro-step (default: 1)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step (default: 1)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: 1e-4)")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps (default: 0)")
    p.add_argument("--lr-schedule", choices=("cosine", "linear", "constant"), default="cosine",
                   help="after warmup: cosine or linear decay to --min-lr-ratio * lr at --steps, or constant "
                   "(default: cosine)")
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="final lr / peak lr for cosine and linear "
                   "(default: 0)")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (default: 1e-2)")
    p.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("B1", "B2"),
                   help="AdamW's moment decay rates, each in [0, 1) (default: 0.9 0.999)")
    p.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW's epsilon, > 0 (default: 1e-8)")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip, 0 = off (default: 1.0)")
    p.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay of the trained weights (default: 0.9999)")
    p.add_argument("--no-ema-warmup", action="store_true", help="no (1+n)/(10+n) EMA warmup (CompVis LitEma)")
    p.add_argument("--precision", choices=("bf16", "fp32"), help="compute precision; params stay fp32 "
                   "(default: bf16 on GPU/TPU, fp32 on CPU)")
    p.add_argument("--remat", action="store_true", help="rematerialise U-Net blocks (less memory, ~30%% slower)")
    p.add_argument("--resolution", type=int, help="training resolution, a multiple of the model's size step "
                   "(default: a resumed run's, else the model's image size, 512 for SD)")
    p.add_argument("--random-flip", action="store_true", help="random horizontal flips")
    p.add_argument("--random-crop", action="store_true", help="crop each image at a random place in every epoch "
                   "(diffusers' default) instead of its centre (default: centre; not with --precompute-latents)")
    p.add_argument("--shuffle-caption", action="store_true", help="shuffle the comma-separated tags of each caption "
                   "every epoch (kohya's --shuffle_caption, for tag captions such as '1girl, red hair, smile')")
    p.add_argument("--keep-tokens", type=int, default=0, metavar="N", help="with --shuffle-caption: keep the first "
                   "N tags in place (e.g. a trigger word) (default: 0)")
    p.add_argument("--aspect-buckets", action="store_true", help="aspect-ratio bucketing (NovelAI's; kohya's "
                   "--enable_bucket, SDXL's multi-aspect training): each image is resized to cover, and cropped to, "
                   "the bucket nearest its aspect ratio (width x height with sides from resolution/2 to "
                   "2 x resolution in steps of 64, at most resolution^2 pixels) instead of a centre square; every "
                   "step's images share one bucket, and each bucket used compiles its own train step")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="probability of the empty caption "
                   "(default: 0.1)")
    p.add_argument("--snr-gamma", type=float, help="min-SNR-gamma loss weighting (Hang et al. 2023; 5 is the "
                   "paper's value): faster convergence when training from scratch (default: off, plain L_simple)")
    p.add_argument("--debiased-loss", action="store_true", help="also weight the loss by 1/sqrt(SNR_t) (Yu et al. "
                   "2024; kohya's --debiased_estimation_loss): more weight on the noisy steps that decide layout")
    p.add_argument("--multires-noise", type=float, default=0.0, metavar="DISCOUNT", help="multi-resolution noise "
                   "(Whitaker 2023; kohya's --multires_noise_discount): adds DISCOUNT^i-weighted noise at 1/2^i "
                   "resolution, so less of the coarse layout can be read off z_t and more must come from the "
                   "caption (e.g. 0.8; default: 0, white noise)")
    p.add_argument("--noise-offset", type=float, default=0.0, metavar="S", help="offset noise (Guttenberg 2023; "
                   "diffusers' and kohya's --noise_offset): adds S x one random value per latent channel to the "
                   "noise, so the model learns to make images much darker or brighter than average (e.g. 0.1; "
                   "default: 0)")
    p.add_argument("--input-perturbation", type=float, default=0.0, metavar="GAMMA", help="input perturbation "
                   "(Ning et al. 2023; diffusers' --input_perturbation, kohya's --ip_noise_gamma): z_t is made from "
                   "the noise plus GAMMA x fresh N(0, I) noise while the target stays the unperturbed noise (or its "
                   "v), simulating the errors that earlier sampling steps leave in x_t (exposure bias) (e.g. 0.1, "
                   "diffusers' recommended value; default: 0, off)")
    p.add_argument("--train-text-encoder", action="store_true", help="train the CLIP text encoder jointly with the "
                   "U-Net (same lr; for small models trained from scratch; default: frozen, as SD fine-tuning); with "
                   "--lora-rank, a LoRA on the text encoders' Linears as well (kohya's default)")
    p.add_argument("--lora-rank", type=int, default=0, metavar="R", help="train a LoRA of rank R on the frozen "
                   "U-Net instead of the U-Net itself (Hu et al. 2021; e.g. 4-64), written as the kohya-ss file "
                   "RUN_DIR/lora.safetensors (read by --lora, A1111, ComfyUI, diffusers) (default: 0, full fine-tune)")
    p.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA alpha: the update is scaled by A / R "
                   "(default: R, scale 1)")
    p.add_argument("--lora-targets", choices=("attn", "transformer"), default="attn", help="kernels the LoRA "
                   "adapts: attn = q, k, v, out of every attention (diffusers' LoRA script), transformer = every "
                   "Linear of the transformer blocks and proj_in/out (kohya's) (default: attn)")
    p.add_argument("--lora-conv-rank", type=int, default=0, metavar="RC", help="with --lora-rank: also adapt the "
                   "ResBlocks and down/upsamplers (kohya's conv_dim, LyCORIS' LoCon): their 3x3 convs at rank RC, "
                   "their time-embedding Linear and 1x1 skip conv at --lora-rank (default: 0, off)")
    p.add_argument("--lora-conv-alpha", type=float, metavar="AC", help="the 3x3 convs' alpha: their update is "
                   "scaled by AC / RC (default: RC, scale 1)")
    p.add_argument("--textual-inversion", metavar="WORD", help="textual inversion (Gal et al. 2022): learn only new "
                   "token vectors for WORD, which the captions use (e.g. '<my-cat>'); the rest of the model stays "
                   "frozen, and RUN_DIR/embedding.safetensors (A1111 format) is read by --embedding FILE:WORD")
    p.add_argument("--init-word", metavar="WORD0", help="with --textual-inversion: the vectors start as this word's "
                   "embedding (one CLIP token, e.g. 'cat' or 'painting')")
    p.add_argument("--num-vectors", type=int, metavar="N", help="with --textual-inversion: vectors (tokens) for the "
                   "word (default: 1)")
    p.add_argument("--instance-prompt", metavar="TEXT", help="DreamBooth: caption every --data image with TEXT "
                   "(e.g. 'a photo of sks dog'; caption files are then not needed)")
    p.add_argument("--class-data", metavar="DIR", help="DreamBooth prior preservation (Ruiz et al. 2023): class "
                   "images, each micro-batch adding as many of them as instance images; the base model generates "
                   "them into DIR (with --class-prompt) until it holds --num-class-images")
    p.add_argument("--class-prompt", metavar="TEXT", help="the class images' caption and generation prompt (e.g. "
                   "'a photo of dog')")
    p.add_argument("--num-class-images", type=int, default=100, metavar="N", help="class images to have in "
                   "--class-data (default: 100)")
    p.add_argument("--prior-loss-weight", type=float, default=1.0, metavar="W", help="weight of the class images' "
                   "loss (default: 1.0)")
    p.add_argument("--allow-empty-captions", action="store_true", help="train images without captions as ''")
    p.add_argument("--precompute-latents", action="store_true", help="encode images/captions once, cache on disk")
    p.add_argument("--seed", type=int, help="seed of data order and all randomness (default: a resumed run's, "
                   "else 0)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in RUN_DIR (with the "
                   "run's seed and resolution; other changed settings are named in a note)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (default: 500)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default: 3)")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop with a checkpoint after N >= 1 steps in this run (then --resume)")
    p.add_argument("--sample-every", type=int, default=0, metavar="N",
                   help="sample images every N steps, 0 = never (default: 0)")
    p.add_argument("--sample-prompt", action="append", default=[], metavar="TEXT", help="sample prompt (repeat)")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of the samples (default: 20)")
    p.add_argument("--export", choices=("ema", "raw", "none"), default="ema",
                   help="trained weights written to RUN_DIR/model (a LoRA run: RUN_DIR/lora.safetensors) at the end "
                   "(default: ema)")
    p.add_argument("--export-only", action="store_true", help="only export RUN_DIR's latest checkpoint (with "
                   "--export ema or raw)")
    p.add_argument("--num-workers", type=int, default=2, help="image decoding threads, 0 = in the main thread "
                   "(default: 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on a terminal, nor the progress "
                   "line printed every 30 s and at the end otherwise (RUN_DIR/metrics.jsonl has every step either way)")
    p.add_argument("--coordinator", help="multi-host: coordinator address host:port")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help="multi-host: this process's id")
    p.set_defaults(func=run)


def run(args) -> int:
    from ldm_jax.train import export, loop

    if args.export_only:
        if args.export == "none":
            raise UserError("--export-only writes RUN_DIR/model: give --export ema or --export raw, not none")
        export.export_run(args.out, args.checkpoint, args.preset, ema=args.export != "raw", prediction=args.prediction)
        return 0
    if not args.data:
        raise UserError("--data DIR is required (a folder of captioned images)")
    check_args(args)
    from ldm_jax.train.base import check_trainable_early

    check_trainable_early(args.checkpoint, args.preset)
    import logging

    # orbax logs through absl, with tracebacks on a failed save; the failures reach the user as one UserError line.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    from ldm_jax import parallel

    if parallel.init_distributed(args.coordinator, args.num_processes, args.process_id,  # gloo on CPU multi-process
                                 log=lambda m: print(m, flush=True)):
        # every process computes the same replicated update: other hyper-parameters on one host would silently
        # make the hosts' copies of the weights drift apart (paths and worker counts may differ between hosts)
        local = ("func", "checkpoint", "data", "out", "num_workers", "no_progress", "coordinator", "num_processes",
                 "process_id")
        parallel.check_same_everywhere({k: v for k, v in vars(args).items() if k not in local},
                                       "every host needs the same training flags")
    cfg = train_config(args)
    result = loop.train(cfg)
    loss = "" if result["loss"] is None else f" (loss {result['loss']:.4f})"
    print(f"{'trained to' if loss else 'at'} step {result['step']}{loss}; run directory {result['run_dir']}"
          + (f"; {export.result_kind(cfg.step)} {result['model_dir']}" if result["model_dir"] else ""))
    return 0


def check_args(args) -> None:
    """One line naming the flag for each out-of-range number (None: the flag was not given, where that is allowed);
    the ranges are `train.limits.RANGES`, which the configs check too."""
    if args.num_vectors is not None and args.textual_inversion is None:
        raise UserError("--num-vectors is for --textual-inversion WORD")
    for name in limits.RANGES:
        value = getattr(args, name)
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v is not None:
                limits.check_flag(name, v)


def train_config(args):
    """The `TrainConfig` of parsed `ldm-jax train` arguments (after the distributed set-up)."""
    import jax

    from ldm_jax.train.config import TrainConfig
    from ldm_jax.train.state import OptimConfig
    from ldm_jax.train.step import StepConfig

    precision = args.precision or ("fp32" if jax.default_backend() == "cpu" else "bf16")
    try:
        optim = OptimConfig(lr=args.lr, warmup=args.warmup, schedule=args.lr_schedule, total_steps=args.steps,
                            min_lr_ratio=args.min_lr_ratio, b1=args.adam_betas[0], b2=args.adam_betas[1],
                            eps=args.adam_eps, weight_decay=args.weight_decay, clip=args.clip or None,
                            ema_decay=args.ema_decay, ema_warmup=not args.no_ema_warmup)
        step = StepConfig(caption_dropout=args.caption_dropout, grad_accum=args.grad_accum, precision=precision,
                          remat=args.remat, snr_gamma=args.snr_gamma, train_text_encoder=args.train_text_encoder,
                          multires_noise=args.multires_noise, debiased_loss=args.debiased_loss,
                          noise_offset=args.noise_offset, input_perturbation=args.input_perturbation,
                          lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=args.lora_targets,
                          lora_conv_rank=args.lora_conv_rank, lora_conv_alpha=args.lora_conv_alpha,
                          textual_inversion=(args.num_vectors or 1) if args.textual_inversion is not None else 0)
    except ValueError as e:
        raise UserError(str(e)) from None
    return TrainConfig(
        data=args.data, out=args.out, checkpoint=args.checkpoint, preset=args.preset, prediction=args.prediction,
        steps=args.steps,
        batch_size=args.batch_size, resolution=args.resolution, optim=optim, step=step, random_flip=args.random_flip,
        aspect_buckets=args.aspect_buckets, random_crop=args.random_crop, shuffle_caption=args.shuffle_caption,
        keep_tokens=args.keep_tokens, textual_inversion=args.textual_inversion, init_word=args.init_word,
        allow_empty_captions=args.allow_empty_captions, seed=args.seed, resume=args.resume,
        save_every=args.save_every, keep=args.keep, sample_every=args.sample_every,
        sample_prompts=tuple(args.sample_prompt), sample_steps=args.sample_steps,
        precompute_latents=args.precompute_latents, export=args.export, stop_after=args.stop_after,
        num_workers=args.num_workers, progress=not args.no_progress, instance_prompt=args.instance_prompt,
        class_data=args.class_data, class_prompt=args.class_prompt, num_class_images=args.num_class_images,
        prior_loss_weight=args.prior_loss_weight)
