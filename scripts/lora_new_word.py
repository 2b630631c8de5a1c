"""Does LoRA training learn? Teach the bundled shapes model a new word with `ldm-jax train --lora-rank` and measure
it with the pixel analysis of `ldm_jax.data.shapes_eval` (no learned judge).

The word "zorp" means triangle: half of the training images are triangles captioned with "zorp" in place of
"triangle", the other half ordinary shapes images with their usual captions (so that the LoRA does not turn every
shape into a triangle). Before and after, the same prompts are sampled with the same seeds:

- "zorp" prompts (every colour, position and background, the shape named "zorp"): how often the shape drawn is a
  triangle, and how often colour, position and background all match;
- the held-out prompts of tests/test_default_model.py (compositions the base never saw): adherence with the shape
  named as usual, to see what the LoRA costs the rest of the model.

    python scripts/lora_new_word.py --out /tmp/zorp [--steps 400 --rank 8]

Writes OUT/data, OUT/run (the run, RUN_DIR/lora.safetensors) and OUT/result.json; prints the table of README's
"LoRA training" figures. ~5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

WORD = "zorp"


def write_data(root: str, n: int, seed: int) -> None:
    """n images: even indices triangles captioned with WORD, odd ones ordinary training images."""
    import numpy as np
    from PIL import Image

    from ldm_jax.data.shapes import caption, is_held_out, render, sample_attributes

    os.makedirs(root, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        while True:
            attrs = sample_attributes(rng)
            if i % 2 == 0:
                attrs = dataclasses.replace(attrs, shape="triangle")
            if not is_held_out(attrs):
                break
        text = caption(attrs, rng)
        if i % 2 == 0:
            text = text.replace("triangle", WORD)
        Image.fromarray(render(attrs, 64, rng)).save(os.path.join(root, f"{i:05d}.png"))
        with open(os.path.join(root, f"{i:05d}.txt"), "w", encoding="utf-8") as f:
            f.write(text)


def word_prompts(n: int, seed: int):
    """n complete triangle combinations, captioned canonically with WORD for "triangle"."""
    import numpy as np

    from ldm_jax.data.shapes import caption, sample_attributes

    rng, out = np.random.default_rng([seed, 99]), []
    for _ in range(n):
        attrs = sample_attributes(rng)
        attrs = dataclasses.replace(attrs, shape="triangle")
        out.append((caption(attrs).replace("triangle", WORD), attrs))
    return out


def evaluate(sd, prompts, seed: int) -> dict:
    import ldm_jax
    from ldm_jax.data.shapes_eval import adherence

    images = ldm_jax.txt2img(sd, [p for p, _ in prompts], steps=30, seed=seed, height=64, width=64)
    result = adherence(images, [a for _, a in prompts])
    return {k: round(v, 3) for k, v in result.items() if k != "per_image"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=800)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval", type=int, default=60, help="prompts per evaluation")
    args = ap.parse_args(argv)

    import ldm_jax
    from ldm_jax.cli.main import main as cli
    from ldm_jax.data.shapes import held_out_prompts

    data, run = os.path.join(args.out, "data"), os.path.join(args.out, "run")
    if not os.path.isdir(data):
        write_data(data, args.images, seed=7)
    word, held = word_prompts(args.eval, seed=7), held_out_prompts(args.eval, 0)
    base = ldm_jax.load(None)
    before = {"word": evaluate(base, word, 1), "held_out": evaluate(base, held, 1)}
    print("before:", before, flush=True)
    rc = cli(["train", "--data", data, "--out", run, "--steps", str(args.steps), "--batch-size",
              str(args.batch_size), "--lora-rank", str(args.rank), "--lr", str(args.lr), "--lr-schedule", "constant",
              "--precompute-latents", "--save-every", str(args.steps), "--ema-decay", "0.99", "--resolution", "64",
              "--caption-dropout", "0.1", "--no-progress"] + (["--resume"] if os.path.isdir(run) else []))
    if rc:
        return rc
    tuned = ldm_jax.load(None, loras=[(os.path.join(run, "lora.safetensors"), 1.0)])
    after = {"word": evaluate(tuned, word, 1), "held_out": evaluate(tuned, held, 1)}
    print("after:", after)
    result = {"settings": vars(args), "before": before, "after": after}
    with open(os.path.join(args.out, "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print("| prompts | shape before | shape after | all (colour, position, background) before | after |")
    for k in ("word", "held_out"):
        print(f"| {k} | {before[k].get('shape')} | {after[k].get('shape')} | {before[k]['all']} | {after[k]['all']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
