"""Retrain the small text-to-image model that ldm-jax ships as its default (`ldm_jax/assets/shapes/`).

    python scripts/train_shapes_model.py --work runs/shapes --grid docs/shapes_samples.png   # everything, installs

Measured on the 2-core CPU of the development VM: data 2 min, autoencoder ~40 min, U-Net ~0.63 s per step of
32 images (11000 + 7000 + 5000 steps: ~4 h), evaluation 30 s; every phase resumes from its checkpoints when
interrupted. The phases record how the shipped model was made (held-out adherence, all three attributes):

1. Generates the procedural captioned data set (`ldm_jax.data.shapes`, 64x64, held-out combinations excluded).
2. Trains the KL-f4 autoencoder (`ldm_jax.train.autoencoder`; L1 + L2 + small KL) and sets the latent scale to
   1 / std of the latents.
3. Writes a base checkpoint: trained autoencoder, U-Net and CLIP-architecture text encoder at random init.
4. Trains the U-Net alone with `ldm-jax train` (the same code users run; text encoder frozen at its init, latents
   precomputed once): `--unet-steps` with plain L_simple, then resumed up to each of `--total-steps` in turn with
   min-SNR-5 loss weighting (`--snr-gamma`; each resume a warm restart of the cosine schedule over its new
   length). 4000 plain steps gave 8% (with uniform t the large, noisy eps errors of nearly clean steps dominate
   the gradient, and the caption, which decides layout and colour at the noisy steps, was barely used); min-SNR
   weighting to 8000 steps gave 47%, 11000 steps 57%: there the frozen random text encoder was the limit.
5. Phase 3: from that EMA model (RUN_DIR/model), U-Net and text encoder trained jointly (`--train-text-encoder`,
   min-SNR-5, a new run in WORK/joint, cosine over `--joint-steps`, stopped at `--joint-stop-at`): 73% after
   1500 steps, 82% after 2500, 83% at 4500 and 7000 (colour and position 100%; the misses are the order of
   two-tone backgrounds: the U-Net ignored which colour word came first).
6. Phase 4 (`--fix-order-steps`): SD's schedule leaves sqrt(alpha_bar_T) = 0.068 of the image in z_T, enough to
   read a two-tone background's order off z_t at every t, so the caption's order was never needed (docs/notes.md).
   From phase 3's EMA model, with its schedule moved to beta_end 0.02 (sqrt(alpha_bar_T) 0.015; a copy in
   WORK/joint_rescheduled), joint training with multi-resolution noise (`--multires-noise 0.8`) and the
   1/sqrt(SNR) weight (`--debiased-loss`) on top of min-SNR-5 in WORK/multires: a cosine over 3000 steps stopped
   at 2000 (order still at chance), then resumed with a cosine over 5000 steps: at step 4000 every ordered pair
   came out right (98% all three on the 60 test prompts).
7. Exports the EMA weights as fp16 CompVis .safetensors (config in the header) to ldm_jax/assets/shapes/.
8. Measures prompt adherence on held-out prompts with `ldm_jax.data.shapes_eval` (pixel analysis).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np

ASSET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ldm_jax", "assets", "shapes",
                     "model.safetensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/shapes", help="working directory (data, checkpoints, logs)")
    ap.add_argument("--n", type=int, default=20000, help="training images")
    ap.add_argument("--vae-images", type=int, default=4000, help="images (in memory) for the autoencoder")
    ap.add_argument("--vae-steps", type=int, default=1200)
    ap.add_argument("--vae-batch-size", type=int, default=16)
    ap.add_argument("--unet-steps", type=int, default=4000, help="phase 1: plain L_simple")
    ap.add_argument("--total-steps", default="8000,11000", help="phase 2 (min-SNR-5) continues up to each of "
                    "these in turn, each a resume with its own cosine length (default: 8000,11000)")
    ap.add_argument("--joint-steps", type=int, default=10000, help="phase 3: U-Net and text encoder trained "
                    "jointly (--train-text-encoder, min-SNR-5) from phase 2's EMA model, cosine over this many steps "
                    "(0: skip)")
    ap.add_argument("--joint-stop-at", type=int, default=7000, help="stop phase 3 at this step (its adherence had "
                    "been flat since step 2500; default: 7000)")
    ap.add_argument("--fix-order-steps", default="2000/3000,5000/5000", help="phase 4 (two-tone order): joint "
                    "training from phase 3's EMA model with a lower-leak schedule, --multires-noise 0.8 and "
                    "--debiased-loss; STOP/COSINE pairs in turn, each resuming with a cosine over COSINE steps and "
                    "stopping at STOP (the shipped run: 2000/3000 then 5000/5000; '' skips the phase)")
    ap.add_argument("--beta-end", type=float, default=0.02, help="phase 4's schedule end (SD: 0.012; 0.02 lowers "
                    "sqrt(alpha_bar_T) from 0.068 to 0.015)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-install", action="store_true", help="do not copy the result into ldm_jax/assets")
    ap.add_argument("--grid", help="also save a 4x4 grid of held-out samples here (README: docs/shapes_samples.png)")
    a = ap.parse_args()

    import dataclasses

    from convert.mapping import params_to_state_dict
    from convert.safetensors_io import write_safetensors
    from ldm_jax.cli.main import main as cli
    from ldm_jax.configs import shapes
    from ldm_jax.data.shapes import make_dataset, write_dataset
    from ldm_jax.loading import CONFIG_METADATA_KEY
    from ldm_jax.models.build import random_params
    from ldm_jax.train.autoencoder import latent_scale, train_autoencoder

    os.makedirs(a.work, exist_ok=True)
    t0 = time.time()
    data_dir = os.path.join(a.work, "data")
    if not os.path.exists(os.path.join(data_dir, "metadata.jsonl")):
        print(f"writing {a.n} images to {data_dir} ...", flush=True)
        write_dataset(data_dir, a.n, a.seed, size=64)

    base = os.path.join(a.work, "base.safetensors")
    if not os.path.exists(base):
        config = shapes()
        images = np.stack([im for im, _, _ in make_dataset(a.vae_images, a.seed + 1, size=64)])
        images = images.astype(np.float32) / 127.5 - 1.0
        vae, metrics = train_autoencoder(config, images, steps=a.vae_steps, batch_size=a.vae_batch_size,
                                         seed=a.seed)
        scale = latent_scale(config, vae, images[:1024])
        config = dataclasses.replace(config, latent_scale=round(scale, 5))
        print(f"autoencoder: {metrics}, latent scale {config.latent_scale}", flush=True)
        params = random_params(config, a.seed + 2, components=("unet", "text_encoder"))
        params["vae"] = vae
        write_safetensors(base, params_to_state_dict(params), {CONFIG_METADATA_KEY: config.to_json()})
        print(f"wrote {base} ({time.time() - t0:.0f}s so far)", flush=True)

    run = os.path.join(a.work, "run")
    ckpts = os.path.join(run, "checkpoints")

    common = ["train", "--checkpoint", base, "--data", data_dir, "--out", run, "--batch-size", str(a.batch_size),
              "--lr", str(a.lr), "--warmup", "300", "--min-lr-ratio", "0.05", "--ema-decay", "0.999",
              "--resolution", "64", "--precompute-latents", "--save-every", "500", "--sample-every", "1000",
              "--sample-prompt", "a red circle in the top left corner on a white background",
              "--sample-prompt", "a blue square in the center on a black background", "--seed", str(a.seed)]
    if (latest_step(ckpts) or 0) < a.unet_steps:
        resume = ["--resume"] if latest_step(ckpts) is not None else []
        if cli([*common, "--steps", str(a.unet_steps), "--export", "none", *resume]):
            raise SystemExit("training (phase 1) failed")
    for total in (int(v) for v in a.total_steps.split(",")):
        if (latest_step(ckpts) or 0) < total and cli([*common, "--steps", str(total), "--snr-gamma", "5",
                                                      "--resume", "--export", "none"]):
            raise SystemExit("training (phase 2) failed")
    phase2 = os.path.join(run, "model")  # the EMA U-Net of phase 2, with the frozen text encoder
    if not os.path.exists(os.path.join(phase2, "metadata.json")) and cli(
            ["train", "--export-only", "--out", run, "--checkpoint", base]):
        raise SystemExit("exporting the trained model failed")
    final = phase2
    if a.joint_steps:
        joint, ckpts = os.path.join(a.work, "joint"), os.path.join(a.work, "joint", "checkpoints")
        common[common.index("--checkpoint") + 1] = phase2
        common[common.index("--out") + 1] = joint
        stop = min(a.joint_stop_at or a.joint_steps, a.joint_steps)
        latest = latest_step(ckpts)
        if (latest or 0) < stop:
            resume = ["--resume"] if latest is not None else []
            if cli([*common, "--steps", str(a.joint_steps), "--stop-after", str(stop - (latest or 0)),
                    "--snr-gamma", "5", "--train-text-encoder", *resume]):
                raise SystemExit("training (phase 3) failed")
        if cli(["train", "--export-only", "--out", joint, "--checkpoint", phase2]):  # the latest checkpoint's EMA
            raise SystemExit("exporting the trained model failed")
        final = os.path.join(joint, "model")
    if a.joint_steps and a.fix_order_steps:
        final = fix_order(a, final, common, cli)
    out = os.path.join(a.work, "model.safetensors")
    if cli(["export", final, out, "--dtype", "fp16"]):
        raise SystemExit("export failed")
    print(f"exported {out}: {os.path.getsize(out) / 2**20:.1f} MiB; total {(time.time() - t0) / 60:.0f} min")
    if not a.no_install:
        os.makedirs(os.path.dirname(ASSET), exist_ok=True)
        os.replace(out, ASSET)
        out = ASSET
        print(f"installed {ASSET}")
    evaluate(out, grid_path=a.grid)


def latest_step(ckpts: str) -> int | None:
    """The newest checkpoint's step in a run's checkpoints directory (None: no checkpoint yet)."""
    steps = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []
    return max(steps, default=None)


def fix_order(a, phase3: str, common: list[str], cli) -> str:
    """Phase 4: phase 3's model with its schedule moved to --beta-end, trained jointly with multi-resolution noise
    and the debiased weight on top of min-SNR-5 (see the module docstring); returns the exported EMA model."""
    rescheduled = os.path.join(a.work, "joint_rescheduled")  # phase 3's weights; config.json's schedule changed
    if not os.path.exists(rescheduled):  # made once: delete it (and WORK/multires) if phase 3 is extended
        shutil.rmtree(rescheduled + ".tmp", ignore_errors=True)
        shutil.copytree(phase3, rescheduled + ".tmp")
        with open(os.path.join(phase3, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        cfg["schedule"]["beta_end"] = a.beta_end
        with open(os.path.join(rescheduled + ".tmp", "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        os.replace(rescheduled + ".tmp", rescheduled)
    run = os.path.join(a.work, "multires")
    ckpts = os.path.join(run, "checkpoints")
    common = list(common)
    common[common.index("--checkpoint") + 1] = rescheduled
    common[common.index("--out") + 1] = run
    for part in a.fix_order_steps.split(","):
        stop, cosine = (int(v) for v in part.split("/"))
        latest = latest_step(ckpts)
        done = latest or 0
        if done < stop and cli([*common, "--steps", str(cosine), "--stop-after", str(stop - done), "--snr-gamma",
                                "5", "--debiased-loss", "--multires-noise", "0.8", "--train-text-encoder",
                                *(["--resume"] if latest is not None else [])]):
            raise SystemExit("training (phase 4) failed")
    if cli(["train", "--export-only", "--out", run, "--checkpoint", rescheduled]):
        raise SystemExit("exporting the trained model failed")
    return os.path.join(run, "model")


def evaluate(path: str | None, n: int = 60, seed: int = 0, grid_path: str | None = None) -> dict:
    """Prompt adherence of `path` (None: the bundled model) on n held-out prompts (see tests/test_default_model.py
    for the threshold); with grid_path, the first 16 images as a 4x4 grid (2x nearest upscale) and their prompts next
    to it (.txt)."""
    import ldm_jax
    from ldm_jax.data.shapes import held_out_prompts
    from ldm_jax.data.shapes_eval import adherence
    from ldm_jax.images import grid

    sd = ldm_jax.load(path)
    prompts = held_out_prompts(n, seed)
    images = ldm_jax.txt2img(sd, [p for p, _ in prompts], steps=30, seed=seed, height=64, width=64)
    result = adherence(images, [attrs for _, attrs in prompts])
    print({k: v for k, v in result.items() if k != "per_image"})
    if grid_path:
        from PIL import Image

        g = grid(images[:16], cols=4)
        Image.fromarray(g).resize((g.shape[1] * 2, g.shape[0] * 2), Image.NEAREST).save(grid_path)
        with open(os.path.splitext(grid_path)[0] + ".txt", "w", encoding="utf-8") as f:
            for i, ((text, _), m) in enumerate(zip(prompts[:16], result["per_image"][:16])):
                missed = [k for k in ("color", "position", "background") if not m.get(k, True)]
                verdict = "ok" if not missed else "wrong " + ", ".join(missed)
                f.write(f"row {i // 4 + 1} col {i % 4 + 1}: {text}  [{verdict}]\n")
        print(f"wrote {grid_path}")
    return result


if __name__ == "__main__":
    main()
