"""Training SDXL's U-Net (tiny-xl): the loader's size and crop numbers, one real train step against diffusers'
SDXL U-Net, the latent cache against the image path, and the CLI end to end (train, sample, export, txt2img).

(a) Sizes: the loader records each image's size before resizing and where the crop starts in the resized image;
    checked against the pixels themselves (an image whose every column and row has its own value).
(b) One step: the compiled step (VAE posterior sample, both frozen text encoders, caption dropout as zeros, y with
    each image's sizes, L_simple, AdamW) against diffusers' UNet2DConditionModel ("text_time") loaded from the same
    weights by diffusers' own single-file conversion and fed what diffusers' `train_text_to_image_sdxl.py` feeds it:
    `add_time_ids` = original size + crop top-left + target size (computed here from PIL sizes), pooled text as
    `text_embeds`. Loss and global gradient norm <= 1e-4 relative (fp32, highest matmul precision). With
    `--train-text-encoder` both encoders train: the context and pooled text then come from transformers' CLIP
    models (`convert.torch_reference`) inside torch's graph, and the gradient norms of each encoder agree too.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ldm_jax.cli.main import main
from tests.parity import rel_err, torch_q_sample

RES = 16
SIZES = {"red": (24, 16), "green": (16, 40), "blue": (20, 20), "yellow": (12, 12), "white": (33, 17),
         "black": (16, 16), "purple": (18, 30), "cyan": (40, 24)}  # (width, height)
COMMON = ["--preset", "tiny-xl", "--resolution", str(RES), "--batch-size", "8", "--lr", "1e-3", "--lr-schedule",
          "constant", "--adam-eps", "1e-5", "--clip", "10", "--caption-dropout", "0.25", "--seed", "0",
          "--precision", "fp32", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 images of different sizes and aspect ratios, each pixel coloured by its position and the image's hue."""
    from tests.train_worker import COLOURS

    root = tmp_path_factory.mktemp("xl") / "shapes"
    root.mkdir()
    for name, (w, h) in SIZES.items():
        yy, xx = np.mgrid[0:h, 0:w]
        pixels = np.stack([(xx * 255) // max(w - 1, 1), (yy * 255) // max(h - 1, 1),
                           np.full_like(xx, COLOURS[name][2])], axis=-1)
        Image.fromarray(pixels.astype(np.uint8)).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(f"a {name} gradient")
    return str(root)


def _diffusers_crop(w, h):
    """diffusers' train_text_to_image_sdxl.py center crop: the shorter side resized to RES, then (top, left)."""
    rw, rh = (RES, int(RES * h / w)) if w <= h else (int(RES * w / h), RES)
    return rw, rh, (int(round((rh - RES) / 2.0)), int(round((rw - RES) / 2.0)))


def test_sizes_and_crops_name_the_pixels_taken(tmp_path):
    from ldm_jax.train import data as D
    from ldm_jax.train import example as E

    w, h = 64, 32  # resized to 32x16: a crop can start anywhere in x in [0, 16]
    index = np.arange(w)[None, :].repeat(h, 0)
    Image.fromarray(np.stack([index * 4, index * 4, index * 4], -1).astype(np.uint8)).save(tmp_path / "a.png")
    resized = np.asarray(Image.fromarray(np.stack([index * 4] * 3, -1).astype(np.uint8)).resize((32, 16), E.RESAMPLE),
                         np.float32) / 127.5 - 1
    lefts, flips = set(), 0
    for seed in range(12):
        ex = E.load_example(tmp_path / "a.png", 16, center_crop=False, random_flip=True,
                            rng=np.random.default_rng(seed))
        top, left = ex.crop_top_left
        assert ex.original_size == (64, 32) and ex.resized_size == (32, 16) and top == 0
        if not np.array_equal(ex.pixels, resized[:, left:left + 16]):  # flipped: a crop of the flipped image
            np.testing.assert_array_equal(ex.pixels, resized[:, ::-1][:, left:left + 16])
            flips += 1
        lefts.add(left)
    assert 0 < flips < 12
    assert len(lefts) > 3
    with D.batches(D.scan_dataset(tmp_path, allow_empty_captions=True), batch_size=1, resolution=16, seed=0,
                   num_workers=0) as it:
        row = next(it)
    assert row["original_sizes"].tolist() == [[32, 64]] and row["crop_top_left"].tolist() == [[0, 8]]


@pytest.mark.parametrize("text", [False, True], ids=["frozen-text", "train-text-encoder"])
def test_one_step_matches_diffusers_sdxl_unet(data, text):
    import optax
    import torch

    from convert import torch_reference
    from convert.keys import layout_of
    from convert.mapping import params_to_state_dict
    from ldm_jax import parallel
    from ldm_jax.cli.cmd_train import train_config
    from ldm_jax.cli.main import build_parser
    from ldm_jax.train import data as D
    from ldm_jax.train import loss as L
    from ldm_jax.train.base import load_base
    from ldm_jax.train.state import init_state
    from ldm_jax.conditioning import repad
    from ldm_jax.train.step import (components, frozen_inputs, jitted_train_step, key_data, shard_batch,
                                    size_conditioning, trainable)

    flags = ["--train-text-encoder"] * text
    tc = train_config(build_parser().parse_args(["train", *COMMON, *flags, "--data", data, "--out", "unused"]))
    sd = load_base(None, "tiny-xl", 0)
    cfg, mesh = sd.config, parallel.data_mesh()
    with D.batches(D.scan_dataset(data), batch_size=8, resolution=RES, seed=0, num_workers=0) as it:
        rows = next(it)
    ids = sd.tokenize(rows["captions"])
    step = jitted_train_step(cfg, tc.optim, tc.step, mesh)
    state = init_state(parallel.replicate(trainable(sd.params, tc.step), mesh), tc.optim, parallel.replicated(mesh))
    batch = shard_batch({"images": rows["images"][None], "ids": ids[None],
                         "sizes": size_conditioning(rows, RES)[None]}, mesh)
    frozen = frozen_inputs({c: v for c, v in sd.params.items() if c not in tc.step.trained}, sd.tokenize([""]), mesh)
    state0 = params_to_state_dict({c: jax.tree_util.tree_map(np.asarray, sd.params[c])
                                   for c in ("unet", "text_encoder", "text_encoder_2")}, text_layout=layout_of(cfg))
    new, m = step(state, batch, parallel.replicate(key_data(0), mesh), frozen)

    @jax.jit
    def inputs(params, images, ids):
        keys = L.example_keys(jax.random.fold_in(jax.random.key(0), 0), jnp.arange(8))
        d = L.draw(keys, (8, 8, 4), cfg.schedule.n_steps, tc.step.caption_dropout)
        z0 = L.posterior_sample(sd.encode_moments(params, images), d.posterior_eps, cfg.latent_scale)
        ctx, pooled = sd.encode_text(params, ids, pooled=True)
        return z0, d, ctx, pooled

    z0, d, ctx, pooled = inputs(sd.params, rows["images"], ids)
    keep = ~np.asarray(d.drop)
    assert 0 < keep.sum() < 8  # some captions dropped (zeros), not all
    time_ids = []
    for i in rows["indices"]:  # diffusers: original (h, w) + crop (top, left) + target (h, w)
        w, h = Image.open(D.scan_dataset(data).paths[i]).size
        time_ids.append([h, w, *_diffusers_crop(w, h)[2], RES, RES])
    model = torch_reference.build_unet(cfg)
    model.load_compvis(state0)
    models = {"unet": model}
    if text:  # the context and pooled text from transformers' CLIP models, inside torch's graph
        models["text_encoder"] = torch_reference.build_text_encoder(cfg)
        models["text_encoder_2"] = torch_reference.build_text_encoder_2(cfg)
        for c in ("text_encoder", "text_encoder_2"):
            models[c].load_compvis(state0)
        ids_2 = repad(np.asarray(ids), cfg.text.eos_token_id, cfg.text_2.pad_token_id)
        out_1 = models["text_encoder"](torch.from_numpy(np.asarray(ids, np.int64)))
        out_2 = models["text_encoder_2"](torch.from_numpy(np.asarray(ids_2, np.int64)))
        ctx = torch.cat([out_1.last_hidden_state, out_2.last_hidden_state], dim=-1)
        assert rel_err(ctx.detach().numpy(), np.asarray(inputs(sd.params, rows["images"], ids)[2])) <= 1e-4
        pooled = out_2.text_embeds
    else:
        ctx, pooled = torch.from_numpy(np.asarray(ctx)), torch.from_numpy(np.asarray(pooled))
    x_t, eps, t = torch_q_sample(z0, d.noise, d.t)
    keep_t = lambda a: a * torch.from_numpy(keep.reshape((-1,) + (1,) * (a.ndim - 1)).astype(np.float32))  # noqa
    out = model(x_t, t, keep_t(ctx), keep_t(pooled), torch.tensor(time_ids, dtype=torch.float32))
    loss = torch.nn.functional.mse_loss(eps, out)
    loss.backward()
    norms = {c: float(torch.sqrt(sum((p.grad ** 2).sum() for p in mod.parameters() if p.grad is not None)))
             for c, mod in models.items()}
    norm = float(np.sqrt(sum(n ** 2 for n in norms.values())))
    print(f"SDXL train step ({'with' if text else 'without'} the text encoders): loss {float(m['loss']):.6f} vs "
          f"{loss.item():.6f}, grad norms {float(m['grad_norm']):.6f} vs {norm:.6f} ({norms})")
    assert rel_err(m["loss"], loss.item()) <= 1e-4
    assert rel_err(m["grad_norm"], norm) <= 1e-4
    if text:  # each encoder's gradient norm, from Adam's first moment (unclipped: optax scaled it by clip / |g|)
        unclip = max(1.0, float(m["grad_norm"]) / tc.optim.clip) / (1 - tc.optim.b1)
        mu = components(optax.tree_utils.tree_get(new.opt_state, "mu"), tc.step)
        for c in ("text_encoder", "text_encoder_2"):
            got = unclip * np.sqrt(sum(float((np.asarray(x) ** 2).sum()) for x in jax.tree_util.tree_leaves(mu[c])))
            assert norms[c] > 1e-6 and rel_err(got, norms[c]) <= 1e-4, c
    assert len({tuple(r) for r in time_ids}) > 4  # the sizes differ between images: y is per image


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """3 steps with a sample and the EMA export; and 3 steps with --precompute-latents, same settings."""
    runs = tmp_path_factory.mktemp("xl-runs")
    for name, extra in (("run", ["--sample-every", "3", "--sample-prompt", "a red gradient", "--sample-steps", "2",
                                 "--export", "ema"]),
                        ("cached", ["--precompute-latents", "--export", "none"])):
        with pytest.warns(UserWarning, match="smaller than resolution 16; upscaled"):
            assert main(["train", *COMMON, "--data", data, "--out", str(runs / name), "--steps", "3", *extra]) == 0
    return runs


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_latent_cache_gives_the_losses_of_the_image_path(trained):
    """The cache holds the moments, both encoders' context, the pooled text and each image's sizes: the same
    random draws give the same losses (moments encoded in another batch: float rounding only)."""
    got, want = _losses(trained / "cached"), _losses(trained / "run")
    assert len(got) == len(want) == 3
    assert rel_err(np.array(got), np.array(want)) <= 1e-4
    sizes = np.load(trained / "cached" / "latent_cache" / "sizes.npy")
    assert sizes.shape == (8, 1, 4) and sorted(map(tuple, sizes[:, 0, :2].tolist())) == sorted(
        (h, w) for w, h in SIZES.values())


def test_sample_export_and_txt2img_from_the_trained_model(trained, tmp_path):
    import ldm_jax

    run = trained / "run"
    assert (run / "samples" / "step0000003-00.png").is_file()
    sd = ldm_jax.load(str(run / "model"))
    assert sd.config.is_sdxl and sd.config.image_size == RES and set(sd.params) == {
        "unet", "vae", "text_encoder", "text_encoder_2"}
    assert main(["txt2img", "--checkpoint", str(run / "model"), "--prompt", "a red gradient", "--steps", "2",
                 "--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*.png"))) == 1


def test_bench_train_runs_the_sdxl_step(data):
    """`ldm-jax bench --train --preset tiny-xl` feeds the step SDXL's sizes and both encoders (the tests' settings:
    the program the runs above compiled)."""
    from ldm_jax.bench import bench_train
    from ldm_jax.cli.cmd_train import train_config
    from ldm_jax.cli.main import build_parser

    tc = train_config(build_parser().parse_args(["train", *COMMON, "--data", data, "--out", "unused"]))
    row = bench_train("tiny-xl", 8, RES, iters=1, optim=tc.optim, step_cfg=tc.step)
    assert row.what == "train_step" and row.images == 8 and row.seconds > 0 and row.extra["program_mb"] > 0


def test_refused_before_reading_data(tmp_path):
    """Inpainting U-Nets are refused in one line before --data is looked at."""
    from tests.cli_run import cli

    for args, says in ((["--preset", "sd1-inpaint"], "training inpainting U-Nets"),):
        rc, _, err = cli("train", *args, "--data", tmp_path / "missing", "--out", tmp_path / "run")
        assert rc == 2 and err.count("\n") == 1 and says in err, err
