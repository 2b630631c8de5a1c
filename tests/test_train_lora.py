"""LoRA training (`ldm-jax train --lora-rank`, `ldm_jax/train/lora.py`): one real step against torch, the kohya file
against our own kohya LoRA loader, and the CLI (stop, resume, samples, export, refusals).

(a) One step: the compiled step with a LoRA (rank 4, alpha 8, every transformer Linear and 1x1 conv, and the
    ResBlocks and resamplers with their 3x3 convs at conv rank 2, alpha 3: LoCon; up started non-zero so both
    factors have gradients) against labml's U-Net run through `torch.func.functional_call` with
    W' = W + (alpha / r) up @ down built from torch leaves: loss, gradient norm and the gradients of every down and
    up <= 1e-4 relative (fp32, highest matmul precision).
(b) The written file, merged by `convert.lora` (the loader of `--lora`, proven against diffusers' own kohya
    conversion in tests/test_lora*.py), gives the U-Net the run's merge gives: <= 1e-6, SD 1.x and SDXL names; and
    the text encoder's with `--train-text-encoder`.
(c) With `--train-text-encoder` (LoRA on the text encoder too): the step's gradients of every factor equal the chain
    rule through the full joint step's gradients at the merged weights (dL/d down = s G up^T, dL/d up = s down^T G,
    G = dL/dW'; the joint step is proven against torch in tests/test_train_text_encoder.py): <= 1e-4.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.cli.main import build_parser, main
from tests.parity import rel_err, torch_q_sample
from tests.train_worker import COMMON, make_dataset, step_gradients

LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "transformer", "--lora-conv-rank", "2",
        "--lora-conv-alpha", "3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("lora") / "squares")


def _config(data, *extra):
    from ldm_jax.cli.cmd_train import train_config

    return train_config(build_parser().parse_args(["train", *COMMON, *LORA, *extra, "--data", data, "--out", "x"]))


def _random_lora(config, targets, rank, seed, text_encoder=False, conv_rank=0):
    from ldm_jax.train import lora

    tree = lora.init(config, targets, rank, seed, text_encoder, conv_rank)
    rng = np.random.default_rng(seed)
    return {n: {"down": m["down"], "up": jnp.asarray(rng.normal(0, 0.05, m["up"].shape), jnp.float32)}
            for n, m in tree.items()}


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree_util.tree_leaves(tree)])


def test_one_lora_step_matches_torch(data):
    import optax
    import torch

    from convert.lora_names import module_table
    from convert.mapping import params_to_state_dict
    from convert.torch_reference import build
    from ldm_jax import parallel
    from ldm_jax.train import data as D
    from ldm_jax.train import lora
    from ldm_jax.train import loss as L
    from ldm_jax.train.base import load_base
    from ldm_jax.train.state import init_state
    from ldm_jax.train.step import frozen_inputs, jitted_train_step, key_data, shard_batch

    tc = _config(data)
    sd = load_base(None, "tiny", 0)
    cfg, mesh, s = sd.config, parallel.data_mesh(), tc.step
    modules = lora.modules(cfg, s.lora_targets, conv=True)
    assert any(len(shape) == 4 and shape[0] == 1 for _, shape in modules.values())  # 1x1 conv proj_in/out
    assert sum(lora.is_spatial(shape) for _, shape in modules.values()) == 18  # LoCon: 16 ResBlock convs, 2 resamplers
    lora0 = _random_lora(cfg, s.lora_targets, s.lora_rank, seed=1, conv_rank=s.lora_conv_rank)
    with D.batches(D.scan_dataset(data), batch_size=8, resolution=16, seed=0, num_workers=0) as it:
        rows = next(it)
    ids = sd.tokenize(rows["captions"])
    state = init_state(parallel.replicate(lora0, mesh), tc.optim, parallel.replicated(mesh))
    frozen = frozen_inputs(sd.params, sd.tokenize([""]), mesh, unet=True)
    batch = shard_batch({"images": rows["images"][None], "ids": ids[None]}, mesh)
    new, m = jitted_train_step(cfg, tc.optim, s, mesh)(state, batch, parallel.replicate(key_data(0), mesh), frozen)
    grads = jax.tree_util.tree_map(lambda x: np.asarray(x) / (1 - tc.optim.b1),
                                   optax.tree_utils.tree_get(new.opt_state, "mu"))

    @jax.jit
    def inputs(params, images, ids, empty_ids):
        keys = L.example_keys(jax.random.fold_in(jax.random.key(0), 0), jnp.arange(8))
        d = L.draw(keys, (8, 8, 4), cfg.schedule.n_steps, s.caption_dropout)
        z0 = L.posterior_sample(sd.encode_moments(params, images), d.posterior_eps, cfg.latent_scale)
        return z0, d, L.drop_captions(sd.encode_text(params, ids), sd.encode_text(params, empty_ids), d.drop)

    z0, d, ctx = inputs(sd.params, rows["images"], ids, sd.tokenize([""]))
    model = build(cfg, params_to_state_dict({"unet": jax.tree_util.tree_map(np.asarray, sd.params["unet"])}),
                  ("unet",))["unet"]
    own = dict(model.named_parameters())
    table = module_table(cfg)
    leaves, merged = {}, {}
    for name, (_, shape) in modules.items():
        weight = table[name].key[len("model.diffusion_model."):]
        spatial = lora.is_spatial(shape)  # kohya's merge: up [out, r] @ down [r, in * kh * kw]
        down_np = np.asarray(lora0[name]["down"])  # [in, r] or [kh, kw, in, r]
        down = torch.tensor(down_np.reshape(-1, down_np.shape[-1]).T.copy(), requires_grad=True)
        up = torch.tensor(np.asarray(lora0[name]["up"]).T.copy(), requires_grad=True)  # [out, r]
        leaves[name] = (down, up, down_np.shape)
        scale = s.lora_conv_scale if spatial else s.lora_scale
        if spatial:  # rows of down follow (kh, kw, in); torch's kernel is [out, in, kh, kw]
            delta = (up @ down).reshape(shape[-1], *shape[:3]).permute(0, 3, 1, 2)
        else:
            delta = (up @ down).reshape(own[weight].shape)
        merged[weight] = own[weight].detach() + scale * delta
    x_t, eps, t = torch_q_sample(z0, d.noise, d.t)
    out = torch.func.functional_call(model, merged, (x_t, t, torch.from_numpy(np.array(ctx))))
    loss = torch.nn.functional.mse_loss(eps, out)
    loss.backward()
    torch_grads = {n: {"down": dn.grad.numpy().T.reshape(shape), "up": up.grad.numpy().T}
                   for n, (dn, up, shape) in leaves.items()}
    norm = np.sqrt(sum(float((g ** 2).sum()) for g in jax.tree_util.tree_leaves(torch_grads)))
    assert norm < tc.optim.clip  # no clipping: Adam's first moment is (1 - b1) g
    assert rel_err(m["loss"], loss.item()) <= 1e-4 and rel_err(m["grad_norm"], norm) <= 1e-4
    # The time-embedding LoRA of a ResBlock with one channel per GroupNorm group (the tiny preset's 32-channel level)
    # gets no gradient: the norm after it removes any per-channel shift. Both sides must then be ~0.
    vanishing = [(n, k) for n in modules for k in ("down", "up") if np.linalg.norm(torch_grads[n][k]) < 1e-6 * norm]
    assert all(np.linalg.norm(grads[n][k]) < 1e-6 * norm for n, k in vanishing) and len(vanishing) <= 6
    worst = max(rel_err(grads[n][k], torch_grads[n][k]) for n in modules for k in ("down", "up")
                if (n, k) not in vanishing)
    print(f"LoRA step: {len(modules)} modules, loss {float(m['loss']):.6f}, worst gradient rel err {worst:.2e}")
    assert worst <= 1e-4


@pytest.mark.parametrize("preset,targets,text,conv", [("tiny", "transformer", True, 2), ("tiny-xl", "attn", False, 0),
                                                     ("tiny-xl", "attn", True, 3)])
def test_written_file_merges_to_the_runs_unet(tmp_path, preset, targets, text, conv):
    from convert.lora import apply_loras
    from convert.safetensors_io import write_safetensors
    from ldm_jax.configs import preset as get
    from ldm_jax.models.build import random_params
    from ldm_jax.stable_diffusion import StableDiffusion
    from ldm_jax.train import lora
    from ldm_jax.train.step import StepConfig, merged_text_encoder, merged_unet

    cfg = get(preset)
    step = StepConfig(lora_rank=3, lora_alpha=1.5, lora_targets=targets, train_text_encoder=text,
                      lora_conv_rank=conv, lora_conv_alpha=2.5 if conv else None)
    params = jax.tree_util.tree_map(np.asarray, random_params(cfg, 0))
    tree = _random_lora(cfg, targets, 3, seed=2, text_encoder=text, conv_rank=conv)
    path = tmp_path / "l.safetensors"
    conv_alpha = 2.5 if conv else None
    write_safetensors(path, lora.kohya_tensors(tree, cfg, targets, 1.5, conv_alpha),
                      lora.kohya_metadata(cfg, 3, 1.5, {}, conv, conv_alpha))
    merged = apply_loras(StableDiffusion(cfg, params), [(str(path), 1.0)]).params
    got, want = merged["unet"], merged_unet(params["unet"], tree, cfg, step)
    if text:  # SDXL: both encoders, kohya's lora_te1_ / lora_te2_ modules
        for c in lora.text_components(cfg):
            assert rel_err(_flat(merged[c]), _flat(merged_text_encoder(params[c], tree, cfg, step, c))) <= 1e-6
            assert len(lora.text_modules(cfg, c)) >= 12 and not np.array_equal(_flat(merged[c]), _flat(params[c]))
    else:
        assert not any(n.startswith("lora_te") for n in tree)
    assert rel_err(np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(got)]),
                   np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(want)])) <= 1e-6
    changed = sum(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(got),
                                                            jax.tree_util.tree_leaves(params["unet"])))
    assert changed == len(lora.modules(cfg, targets, conv > 0)) > 0


def test_text_encoder_lora_step_follows_the_joint_steps_gradients(data):
    from ldm_jax import parallel
    from ldm_jax.cli.cmd_train import train_config
    from ldm_jax.train import data as D
    from ldm_jax.train import lora
    from ldm_jax.train.base import load_base
    from ldm_jax.train.step import components, frozen_inputs, merged_text_encoder, merged_unet, shard_batch

    tc = _config(data, "--train-text-encoder")
    joint = train_config(build_parser().parse_args(["train", *COMMON, "--train-text-encoder", "--data", data,
                                                    "--out", "x"]))
    sd = load_base(None, "tiny", 0)
    cfg, mesh, s = sd.config, parallel.data_mesh(), tc.step
    tree = _random_lora(cfg, s.lora_targets, s.lora_rank, seed=1, text_encoder=True, conv_rank=s.lora_conv_rank)
    with D.batches(D.scan_dataset(data), batch_size=8, resolution=16, seed=0, num_workers=0) as it:
        rows = next(it)
    batch = shard_batch({"images": rows["images"][None], "ids": sd.tokenize(rows["captions"])[None]}, mesh)

    def grads(step_cfg, params, frozen):
        return step_gradients(cfg, tc.optim, step_cfg, params, batch, frozen, mesh)

    g_lora, loss_lora = grads(s, tree, frozen_inputs(sd.params, sd.tokenize([""]), mesh, unet=True))
    merged = {"unet": merged_unet(sd.params["unet"], tree, cfg, s),
              "text_encoder": merged_text_encoder(sd.params["text_encoder"], tree, cfg, s)}
    g_full, loss_full = grads(joint.step, merged, frozen_inputs({"vae": sd.params["vae"]}, sd.tokenize([""]), mesh))
    g_full = components(g_full, joint.step)
    assert rel_err(loss_lora, loss_full) <= 1e-5
    from flax import traverse_util

    worst, n_text, vanishing = 0.0, 0, 0
    total = np.sqrt(sum(float((np.asarray(g) ** 2).sum()) for g in jax.tree_util.tree_leaves(g_lora)))
    unet_table = lora.modules(cfg, s.lora_targets, conv=True)
    for component, table in (("unet", unet_table), ("text_encoder", lora.text_modules(cfg))):
        flat = traverse_util.flatten_dict(g_full[component])
        for name, (path, shape) in table.items():
            g_w = flat[path].reshape(-1, shape[-1])  # dL/dW' [(kh kw) in, out]
            down, up = (np.asarray(tree[name][k]) for k in ("down", "up"))
            d = down.reshape(-1, down.shape[-1])  # [(kh kw) in, r]
            scale = s.lora_conv_scale if lora.is_spatial(shape) else s.lora_scale
            for got, want in ((g_lora[name]["down"].reshape(d.shape), scale * g_w @ up.T),
                              (g_lora[name]["up"], scale * d.T @ g_w)):
                if np.linalg.norm(want) < 1e-6 * total:  # no gradient (see test_one_lora_step_matches_torch)
                    assert np.linalg.norm(got) < 1e-6 * total
                    vanishing += 1
                else:
                    worst = max(worst, rel_err(got, want))
            n_text += component == "text_encoder"
    print(f"text-encoder LoRA step: {len(tree)} modules ({n_text} text), worst gradient rel err {worst:.2e}")
    assert n_text == 12 and worst <= 1e-4 and vanishing <= 6


def test_cli_stop_resume_samples_and_export(data, tmp_path, capsys):
    from convert.safetensors_io import read_safetensors
    from ldm_jax.train import lora

    run = tmp_path / "run"
    args = ["train", *COMMON, *LORA, "--data", data, "--out", str(run), "--steps", "3"]
    args = [a for a in args if a not in ("--export", "none")]
    samples = ["--sample-every", "3", "--sample-prompt", "a red square", "--sample-steps", "2"]
    with pytest.warns(UserWarning, match="upscaled"):
        assert main([*args, "--stop-after", "2", *samples]) == 0
        assert main([*args, "--resume", *samples]) == 0
    assert "LoRA (ema weights)" in capsys.readouterr().out
    assert (run / "samples" / "step0000003-00.png").is_file()
    tensors, meta = read_safetensors(run / "lora.safetensors")
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
    assert meta["ss_base_model_version"] == "sd_v1"
    from ldm_jax.configs import preset

    assert len(tensors) == 3 * len(lora.modules(preset("tiny"), "transformer", conv=True))
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "3"}
    assert main([*args[:-2], "--steps", "4", "--resume", "--lora-rank", "8"]) == 2
    assert "resume it with the same --lora-rank, --lora-conv-rank" in capsys.readouterr().err
    assert main(["train", "--export-only", "--out", str(run), "--preset", "tiny", "--export", "raw"]) == 0
    assert read_safetensors(run / "lora.safetensors")[1]["ldm_jax_weights"] == "raw"
    assert main([*args, "--train-text-encoder", "--resume"]) == 2
    assert "started without --train-text-encoder" in capsys.readouterr().err


def test_bench_train_times_the_lora_step(data):
    """`ldm-jax bench --train --lora-rank R`: the state is the LoRA, the U-Net a frozen input (the tests' settings:
    the program compiled above)."""
    from ldm_jax.bench import bench_train

    tc = _config(data)
    row = bench_train("tiny", 8, 16, iters=1, optim=tc.optim, step_cfg=tc.step)
    assert row.precision == "fp32+lora4" and row.seconds > 0 and row.extra["program_mb"] > 0


def test_bench_lora_flag_needs_train(capsys):
    assert main(["bench", "--lora-rank", "4"]) == 2
    assert "--lora-rank applies to --train only" in capsys.readouterr().err
    assert main(["bench", "--train", "--lora-rank", "-1"]) == 2
    assert "--lora-rank must be >= 0" in capsys.readouterr().err
