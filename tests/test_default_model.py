"""The bundled model (ldm_jax/assets/shapes, trained by scripts/train_shapes_model.py) draws what it is asked.

Prompt adherence by plain pixel analysis (ldm_jax.data.shapes_eval, no learned classifier) on 60 held-out prompts,
combinations of attributes the model never saw in training. The shipped model (11000 U-Net steps, 7000 with the
text encoder trained jointly, then 5000 on a lower-leak schedule with multi-resolution noise, on a 2-core CPU)
measures colour 98.3%, position 100%, background 100%, all three 98.3% (CPU, jax 0.10; on two 200-prompt sets
92.5% and 94.5%). The thresholds are the issue's target, 90%, which leaves room for other jax versions and backends."""

import numpy as np

import ldm_jax
from ldm_jax.data.shapes import held_out_prompts, is_held_out
from ldm_jax.data.shapes_eval import adherence

N = 60


def test_prompt_adherence_on_held_out_prompts():
    prompts = held_out_prompts(N, seed=0)
    assert len(prompts) == N and all(is_held_out(a) for _, a in prompts)
    sd = ldm_jax.load()
    images = ldm_jax.txt2img(sd, [p for p, _ in prompts], steps=30, seed=0)
    assert images.shape == (N, 64, 64, 3)
    result = adherence(images, [a for _, a in prompts])
    print({k: v for k, v in result.items() if k != "per_image"})
    assert result["color"] >= 0.9 and result["position"] >= 0.9 and result["background"] >= 0.9
    assert result["all"] >= 0.9


def test_cli_default_model(tmp_path):
    from ldm_jax.cli.main import main

    assert main(["txt2img", "--prompt", "a blue square", "--n", "2", "--steps", "10", "--out", str(tmp_path)]) == 0
    pngs = sorted(p for p in tmp_path.iterdir() if p.suffix == ".png")
    assert len(pngs) == 3  # two images and a grid
    from PIL import Image

    with Image.open(pngs[0]) as im:
        assert im.size == (64, 64) and im.text["prompt"] == "a blue square"
        assert np.asarray(im).std() > 5  # not a blank image
