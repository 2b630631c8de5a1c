"""Training (issue 5): one step of the real train step against torch (labml U-Net, torch.optim.AdamW), the loss
falls on a small real task, samples and the exported model, bad input through the CLI, `bench --train`.

Every run uses the settings of `tests.train_worker.COMMON` (one compiled program, see there)."""

import errno
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.cli.main import build_parser, main
from tests.parity import rel_err, torch_q_sample
from tests.train_worker import COMMON, make_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("train") / "squares")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """30 steps from the tiny preset's random init, a sample at the end, the EMA U-Net exported to RUN_DIR/model."""
    run = tmp_path_factory.mktemp("train") / "run"
    with pytest.warns(UserWarning, match="smaller than resolution 16; upscaled"):
        rc = main(["train", *COMMON, "--data", data, "--out", str(run), "--steps", "30", "--save-every", "30",
                   "--sample-every", "30", "--sample-prompt", "a red square", "--sample-steps", "2",
                   "--export", "ema"])
    assert rc == 0
    return run


@pytest.mark.parametrize("name, quarter, end", [("cosine", 0.1 + 0.45 * (1 + np.cos(np.pi / 4)), 0.1),
                                                 ("linear", 1 - 0.9 / 4, 0.1), ("constant", 1.0, 1.0)])
def test_lr_schedules_warm_up_then_decay_to_the_floor(name, quarter, end):
    from ldm_jax.train.state import OptimConfig, lr_schedule

    f = lr_schedule(OptimConfig(lr=2.0, warmup=10, schedule=name, total_steps=110, min_lr_ratio=0.1))
    got = [float(f(s)) / 2.0 for s in (0, 5, 10, 35, 110, 200)]
    np.testing.assert_allclose(got, [0.0, 0.5, 1.0, quarter, end, end], rtol=1e-5, atol=1e-7)


def _train_config(data, out):
    from ldm_jax.cli.cmd_train import train_config

    return train_config(build_parser().parse_args(["train", *COMMON, "--data", data, "--out", str(out)]))


def _tree(params):
    return jax.tree_util.tree_map(lambda x: np.array(x, np.float32), params)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


def _strip(state_dict):
    return [(k[len("model.diffusion_model."):], v) for k, v in state_dict.items()]


def _worst(a, b) -> float:
    """The largest per-tensor relative error max|a - b| / max|b| over two trees of the same structure."""
    return max(rel_err(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_one_step_matches_torch(data, tmp_path):
    """The real compiled train step (VAE posterior sample, caption dropout, L_simple, AdamW, EMA) on a batch of 8
    against labml's U-Net with the same weights, latents, context, t and noise, and torch.optim.AdamW."""
    import torch

    from convert.mapping import params_to_state_dict, state_dict_to_params
    from convert.torch_reference import build
    from ldm_jax import parallel
    from ldm_jax.models.build import abstract_params
    from ldm_jax.train import data as D
    from ldm_jax.train import loss as L
    from ldm_jax.train.base import load_base
    from ldm_jax.train.state import init_state
    from ldm_jax.train.step import frozen_inputs, jitted_train_step, key_data, shard_batch

    tc = _train_config(data, tmp_path / "unused")
    assert tc.optim.schedule == "constant" and tc.optim.warmup == 0
    sd = load_base(None, "tiny", 0)
    cfg, mesh = sd.config, parallel.data_mesh()
    params0 = _tree(sd.params["unet"])
    with D.batches(D.scan_dataset(data), batch_size=8, resolution=16, seed=0, num_workers=0) as it:
        rows = next(it)
    ids = sd.tokenize(rows["captions"])
    step = jitted_train_step(cfg, tc.optim, tc.step, mesh)
    state = init_state(parallel.replicate(sd.params["unet"], mesh), tc.optim, parallel.replicated(mesh))
    batch = shard_batch({"images": rows["images"][None], "ids": ids[None]}, mesh)
    frozen = frozen_inputs(sd.params, sd.tokenize([""]), mesh)
    new, m = step(state, batch, parallel.replicate(key_data(0), mesh), frozen)

    # The step's inputs to the U-Net, rebuilt from the same keys: z_0, t, eps and the (partly dropped) context.
    @jax.jit
    def inputs(params, images, ids, empty_ids):
        keys = L.example_keys(jax.random.fold_in(jax.random.key(0), 0), jnp.arange(8))
        d = L.draw(keys, (8, 8, 4), cfg.schedule.n_steps, tc.step.caption_dropout)
        z0 = L.posterior_sample(sd.encode_moments(params, images), d.posterior_eps, cfg.latent_scale)
        ctx = L.drop_captions(sd.encode_text(params, ids), sd.encode_text(params, empty_ids), d.drop)
        return z0, d, ctx

    z0, d, ctx = inputs(sd.params, rows["images"], ids, sd.tokenize([""]))
    assert 0 < int(d.drop.sum()) < 8  # some captions dropped, not all

    # torch: labml U-Net, labml's alpha_bar (float64 betas -> float32), F.mse_loss, clip_grad_norm_, AdamW.
    model = build(cfg, params_to_state_dict({"unet": params0}), ("unet",))["unet"]
    x_t, eps, t = torch_q_sample(z0, d.noise, d.t)
    loss = torch.nn.functional.mse_loss(eps, model(x_t, t, torch.from_numpy(np.array(ctx))))
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.optim.clip)
    assert float(norm) < tc.optim.clip  # the clip does not trigger
    o = tc.optim
    torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay).step()

    def as_flax(named):
        sd_ = {f"model.diffusion_model.{k}": v.detach().numpy() for k, v in named}
        return state_dict_to_params(sd_, abstract_params(cfg, ("unet",)))[0]["unet"]

    torch_grads = as_flax((k, p.grad) for k, p in model.named_parameters())
    torch_params = as_flax(model.state_dict().items())
    # After one update Adam's first moment is (1 - b1) g: the step's own (unclipped) gradient.
    import optax

    mu = optax.tree_utils.tree_get(new.opt_state, "mu")
    jax_grads = jax.tree_util.tree_map(lambda x: np.asarray(x) / (1.0 - o.b1), mu)
    assert rel_err(m["loss"], loss.item()) <= 1e-4
    assert rel_err(m["grad_norm"], float(norm)) <= 1e-4
    assert rel_err(_flat(jax_grads), _flat(torch_grads)) <= 1e-4
    # Per tensor too, except the tensors whose gradient is exactly zero in exact arithmetic (in the tiny config:
    # biases feeding a GroupNorm with one channel per group): both sides hold rounding noise there (~1e-9).
    gmax = np.abs(_flat(torch_grads)).max()
    live = [(a, b) for a, b in zip(jax.tree_util.tree_leaves(jax_grads), jax.tree_util.tree_leaves(torch_grads))
            if np.abs(b).max() > 1e-6 * gmax]
    assert len(live) > 0.9 * len(jax.tree_util.tree_leaves(torch_grads))
    assert max(rel_err(a, b) for a, b in live) <= 1e-4
    assert rel_err(_flat(_tree(new.params)), _flat(torch_params)) <= 1e-5
    assert rel_err(_flat(_tree(new.params)), _flat(params0)) > 1e-4  # the update did something
    # torch's AdamW fed the step's own gradients: the optimisers agree to float rounding.
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in _strip(params_to_state_dict({"unet": params0}))})
    for name, g in _strip(params_to_state_dict({"unet": jax_grads})):
        model.get_parameter(name).grad = torch.from_numpy(g.copy())
    torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay).step()
    assert rel_err(_flat(_tree(new.params)), _flat(as_flax(model.state_dict().items()))) <= 1e-6
    # EMA after the first update: decay min(0.99, 2/11), ema = p0 - (1 - decay)(p0 - p1)
    dec = 2.0 / 11.0
    ema_ref = jax.tree_util.tree_map(lambda p0, p1: p0 - (1 - dec) * (p0 - p1), params0, _tree(new.params))
    assert rel_err(_flat(_tree(new.ema_params)), _flat(ema_ref)) <= 1e-6
    assert int(new.step) == 1


def test_loss_falls(trained):
    rows = [json.loads(line) for line in open(trained / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 31))
    losses = np.array([r["loss"] for r in rows])
    first, last = losses[:10].mean(), losses[-10:].mean()
    assert last < 0.7 * first, (first, last)
    assert rows[0]["upscaled"] >= 1 and all(r["images_per_s"] > 0 for r in rows)


def test_samples_and_exported_model(trained, tmp_path):
    from PIL import Image

    import ldm_jax
    from ldm_jax.train.checkpoint import Checkpoints

    sample = trained / "samples" / "step0000030-00.png"
    with Image.open(sample) as im:
        assert im.size == (16, 16) and im.text["prompt"] == "a red square" and im.text["step"] == "30"
    with Checkpoints(trained / "checkpoints") as ck:
        assert ck.all_steps() == [30]
        tree = ck.restore(None)[0]
    model = ldm_jax.load(trained / "model")
    assert model.metadata["ema"] is True and model.config.name == "tiny" and model.config.image_size == 16
    assert _worst(_tree(model.params["unet"]), _tree(tree["ema_params"])) == 0.0
    out = tmp_path / "trained.safetensors"
    assert main(["export", str(trained / "model"), str(out)]) == 0
    again = ldm_jax.load(out)
    assert _worst(_tree(again.params), _tree(model.params)) == 0.0


def test_export_on_demand(trained, tmp_path):
    """`ldm-jax train --export-only --export raw`: the latest checkpoint's raw (non-EMA) U-Net as RUN_DIR/model."""
    import shutil

    import ldm_jax
    from ldm_jax.train.checkpoint import Checkpoints

    run = tmp_path / "run"
    shutil.copytree(trained / "checkpoints", run / "checkpoints")
    assert main(["train", "--export-only", "--preset", "tiny", "--out", str(run), "--export", "raw"]) == 0
    with Checkpoints(run / "checkpoints") as ck:
        tree = ck.restore(None)[0]
    model = ldm_jax.load(run / "model")
    assert model.metadata["ema"] is False
    assert _worst(_tree(model.params["unet"]), _tree(tree["params"])) == 0.0


def test_latent_cache_matches_the_image_path(tmp_path):
    """--precompute-latents: cached posterior moments and text embeddings, served in the loader's exact order
    (same positions, same random flips), equal to encoding the loader's images on the fly."""
    from ldm_jax.train import data as D
    from ldm_jax.train import latent_cache
    from ldm_jax.train.base import load_base

    from PIL import Image

    root = tmp_path / "ramps"  # left-right ramps, so that a flip changes the latents
    root.mkdir()
    for i, colour in enumerate(((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255),
                                (255, 0, 255), (128, 128, 128), (255, 255, 255))):
        ramp = np.linspace(0.0, 1.0, 16)[None, :, None] * np.array(colour)[None, None, :]
        Image.fromarray(np.broadcast_to(ramp, (16, 16, 3)).astype(np.uint8)).save(root / f"ramp{i}.png")
        (root / f"ramp{i}.txt").write_text(f"ramp number {i}")
    sd = load_base(None, "tiny", 0)
    ds = D.scan_dataset(root)
    cache = latent_cache.build(sd, ds, 16, True, str(tmp_path / "cache"), log=lambda *_: None)
    assert cache["moments"].shape == (8, 2, 8, 8, 8) and cache["ctx"].shape == (8, 77, 64) and cache["ok"].all()
    assert rel_err(cache["moments"][:, 1], cache["moments"][:, 0]) > 1e-2  # the mirrored images' moments differ
    stamp = os.stat(tmp_path / "cache" / "moments.npy").st_mtime_ns
    latent_cache.build(sd, ds, 16, True, str(tmp_path / "cache"), log=lambda *_: None)  # same fingerprint: reused
    assert os.stat(tmp_path / "cache" / "moments.npy").st_mtime_ns == stamp
    encode, text = jax.jit(sd.encode_moments), jax.jit(sd.encode_text)
    kw = dict(batch_size=4, resolution=16, seed=3, random_flip=True, num_workers=0, position=4)
    with D.batches(ds, **kw) as images, latent_cache.cached_batches(cache, ds, **kw) as cached:
        for _ in range(3):
            a, b = next(images), next(cached)
            assert (a["indices"] == b["indices"]).all() and a["captions"] == b["captions"]
            assert rel_err(b["moments"], encode(sd.params, a["images"])) <= 1e-5
            assert rel_err(b["ctx"], text(sd.params, sd.tokenize(a["captions"]))) <= 1e-5
        assert images.stats.position == cached.stats.position == 16


def _error_line(capsys) -> str:
    # warnings (one line each) reach stderr when pytest's warnings plugin is off (-p no:warnings)
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("ldm-jax train: warning: ")]
    assert len(err) == 1 and err[0].startswith("ldm-jax train: error: "), err
    return err[0]


def test_empty_data_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", *COMMON, "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "run")]) == 2
    assert "empty data directory" in _error_line(capsys)


def test_missing_caption_names_the_file(data, tmp_path, capsys):
    bad = tmp_path / "bad"
    make_dataset(bad)
    (bad / "green.txt").unlink()
    assert main(["train", *COMMON, "--data", str(bad), "--out", str(tmp_path / "run")]) == 2
    line = _error_line(capsys)
    assert "green.png" in line and "--allow-empty-captions" in line


def test_resume_with_another_model_size(trained, data, tmp_path, capsys):
    import dataclasses

    from convert.mapping import params_to_state_dict
    from convert.safetensors_io import write_safetensors
    from ldm_jax import configs
    from ldm_jax.loading import CONFIG_METADATA_KEY
    from ldm_jax.models.build import random_params

    tiny = configs.tiny()
    wide = dataclasses.replace(tiny, name="tiny-wide", unet=dataclasses.replace(tiny.unet, channels=64))
    other = tmp_path / "wide.safetensors"
    write_safetensors(other, params_to_state_dict(random_params(wide, 1)), {CONFIG_METADATA_KEY: wide.to_json()})
    args = [a for a in COMMON if a not in ("--preset", "tiny")]
    assert main(["train", *args, "--checkpoint", str(other), "--data", data, "--out", str(trained), "--resume"]) == 2
    line = _error_line(capsys)
    assert "different model size" in line and "channels 32" in line and "channels 64" in line


def test_disk_full_while_checkpointing(data, tmp_path, capsys, monkeypatch):
    """A write of checkpoint 2 fails with ENOSPC: one clear line, exit 2, checkpoint 1 intact and loadable (resuming
    from a checkpoint left by a failure is tested in test_train_resume.py)."""
    from etils import epath

    from ldm_jax.train.checkpoint import Checkpoints

    run = tmp_path / "run"
    cls = type(epath.Path(str(tmp_path)))
    original = cls.write_text

    def write_text(self, *args, **kwargs):
        if ".orbax-checkpoint-tmp" in str(self) and "/2." in str(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "write_text", write_text)
    assert main(["train", *COMMON, "--data", data, "--out", str(run), "--steps", "2", "--save-every", "1"]) == 2
    line = _error_line(capsys)
    assert "disk full while saving checkpoint step 2" in line and "previous checkpoint (step 1) is intact" in line
    monkeypatch.undo()
    # The failed step's partial directory may still be there: ignored, and removed when the directory is opened.
    with Checkpoints(run / "checkpoints") as ck:
        assert ck.all_steps() == [1]
        tree, meta = ck.restore(None)
        assert meta["step"] == 1 and int(tree["step"]) == 1 and meta["data"]["position"] == 8


def test_bench_train_prints_throughput_and_memory(data, tmp_path):
    from ldm_jax.bench import bench_train, format_rows

    args = build_parser().parse_args(["bench", "--train", "--preset", "tiny", "--size", "16", "--images", "8"])
    assert args.train and args.size == 16
    tc = _train_config(data, tmp_path / "unused")  # the tests' one program (the CLI uses the training defaults)
    row = bench_train("tiny", 8, 16, iters=2, optim=tc.optim, step_cfg=tc.step)
    assert row.what == "train_step" and row.images == 8 and row.seconds > 0
    assert row.extra["images_per_s"] > 0 and row.extra["program_mb"] > 0
    table = format_rows([row])
    assert "train_step" in table and "images_per_s=" in table and "program_mb=" in table


def test_out_of_memory_is_one_line(data, tmp_path, capsys, monkeypatch):
    """XLA's RESOURCE_EXHAUSTED from the step (raised here by a stand-in for the compiled step; a real one at 512x512
    asks the 2-core CPU VM for 455 GiB) is one line with a hint, exit 2, and no run directory is left behind."""
    from ldm_jax.train import loop

    real = loop.jitted_train_step

    class Exhausted:
        def __init__(self, fn):
            self.fn = fn

        def lower(self, *args):
            return self.fn.lower(*args)

        def __call__(self, *args):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 488231587680 bytes.")

    monkeypatch.setattr(loop, "jitted_train_step", lambda *a, **kw: Exhausted(real(*a, **kw)))
    run = tmp_path / "run"
    assert main(["train", *COMMON, "--data", data, "--out", str(run), "--steps", "2"]) == 2
    line = _error_line(capsys)
    assert "out of memory (global batch 8 x 1, 16x16, fp32" in line and "488231587680 bytes" in line
    assert "lower --resolution or --batch-size" in line and "--remat" in line
    assert not run.exists()


@pytest.mark.parametrize("flags", [[], ["--precompute-latents"], ["--precompute-latents", "--train-text-encoder"]])
def test_step_larger_than_the_free_memory_is_refused_before_it_runs(data, tmp_path, capsys, monkeypatch, flags):
    """The compiled step's XLA memory analysis against the free memory (1 MiB here): refused before it runs, and
    with --precompute-latents before the latent cache is built (from abstract batch shapes)."""
    from ldm_jax.train import preflight

    monkeypatch.setattr(preflight, "_available_bytes", lambda device: 2**20)
    run = tmp_path / "run"
    assert main(["train", *COMMON, "--data", data, "--out", str(run), "--steps", "2", *flags]) == 2
    line = _error_line(capsys)
    assert "not enough memory for the train step (global batch 8 x 1, 16x16" in line and "1 MiB" in line
    assert "--remat" in line and not run.exists()


@pytest.mark.parametrize("flags", [["--precompute-latents"], ["--precompute-latents", "--train-text-encoder"]])
def test_abstract_batch_is_the_loaders_batch(data, tmp_path, monkeypatch, flags):
    """With --precompute-latents the step is compiled and checked once, from `step.abstract_cached_batch`: the real
    batch has the same shapes, dtypes and shardings (else the loop compiles and checks it a second time)."""
    from ldm_jax.train import preflight

    calls = []
    monkeypatch.setattr(preflight, "check_fits", lambda compiled, what: calls.append(what))
    assert main(["train", *COMMON, "--data", data, "--out", str(tmp_path / "run"), "--steps", "1", *flags]) == 0
    assert len(calls) == 1


def _set(args, flag, value=None):
    """`args` with `flag`'s value replaced (or the flag and its value removed when value is None)."""
    i = args.index(flag)
    return args[:i] + ([flag, value] if value is not None else []) + args[i + 2:]


def test_resume_keeps_the_seed_and_the_resolution(trained, data, capsys):
    """On --resume a different --seed or --resolution is refused (one line, nothing written: before, the seed was
    silently the run's and the resolution silently changed, rewriting model/config.json's image_size); left out,
    they are the run's; another --batch-size is named in a note."""
    args = ["train", *COMMON, "--data", data, "--out", str(trained), "--steps", "30", "--resume"]
    before = sorted(os.listdir(trained))
    assert main(_set(args, "--seed", "1")) == 2
    assert "started with --seed 0, not 1" in _error_line(capsys)
    assert main(_set(args, "--resolution", "32")) == 2
    assert "trains at --resolution 16, not 32" in _error_line(capsys)
    assert main(_set(args, "--steps", "10")) == 2  # used to re-export step 30 and print "trained to step 30"
    assert "the run is at step 30, past --steps 10" in _error_line(capsys)
    assert main(_set(_set(_set(args, "--seed"), "--resolution"), "--batch-size", "4")) == 0  # finished: no step
    out = capsys.readouterr().out
    assert "resuming" in out and "note: settings differ" in out and "--batch-size 8 -> 4" in out
    assert "nothing to train" in out and "at step 30; run directory" in out and "nan" not in out
    # another base model of the same size (its frozen VAE and text encoder are used from now on) is named too
    other = [*_set(args, "--preset"), "--checkpoint", str(trained / "model")]
    assert main(other) == 0
    assert f"--checkpoint off -> {trained / 'model'}, --preset tiny -> off" in capsys.readouterr().out
    assert sorted(os.listdir(trained)) == before
    assert json.load(open(trained / "model" / "config.json"))["image_size"] == 16
