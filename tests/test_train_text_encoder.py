"""`ldm-jax train --train-text-encoder` (issue 7): the CLIP text encoder trained jointly with the U-Net.

One step against torch (labml U-Net + transformers CLIPTextModel, context and empty-prompt context from the same
encoder, caption dropout, L_simple): loss and the text encoder's gradients. Then a short run through the CLI with
the latent cache: the exported model carries the trained (EMA) text encoder, resume and export keep the setting.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.cli.main import build_parser, main
from tests.parity import rel_err, torch_q_sample
from tests.train_worker import COMMON, make_dataset

TEXT = ["--train-text-encoder"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("text") / "squares")


def _tree(params):
    return jax.tree_util.tree_map(lambda x: np.array(x, np.float32), params)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


def test_one_joint_step_matches_torch(data, tmp_path):
    import optax
    import torch

    from convert.mapping import params_to_state_dict, state_dict_to_params
    from convert.torch_reference import build
    from ldm_jax import parallel
    from ldm_jax.cli.cmd_train import train_config
    from ldm_jax.models.build import abstract_params
    from ldm_jax.train import data as D
    from ldm_jax.train import loss as L
    from ldm_jax.train.base import load_base
    from ldm_jax.train.state import init_state
    from ldm_jax.train.step import components, frozen_inputs, jitted_train_step, key_data, shard_batch, trainable

    tc = train_config(build_parser().parse_args(["train", *COMMON, *TEXT, "--data", data, "--out", str(tmp_path)]))
    sd = load_base(None, "tiny", 0)
    assert tc.step.train_text_encoder and set(trainable(sd.params, tc.step)) == {"unet", "text_encoder"}
    cfg, mesh = sd.config, parallel.data_mesh()
    params0 = _tree({c: sd.params[c] for c in ("unet", "text_encoder")})
    with D.batches(D.scan_dataset(data), batch_size=8, resolution=16, seed=0, num_workers=0) as it:
        rows = next(it)
    ids, empty = sd.tokenize(rows["captions"]), sd.tokenize([""])
    step = jitted_train_step(cfg, tc.optim, tc.step, mesh)
    state = init_state(parallel.replicate(trainable(sd.params, tc.step), mesh), tc.optim, parallel.replicated(mesh))
    frozen = frozen_inputs({"vae": sd.params["vae"]}, empty, mesh)
    assert set(frozen) == {"vae", "uncond_ids"}
    batch = shard_batch({"images": rows["images"][None], "ids": ids[None]}, mesh)
    new, m = step(state, batch, parallel.replicate(key_data(0), mesh), frozen)

    @jax.jit
    def draws(params, images):  # the step's z_0, t, eps and dropout coins, from the same keys
        keys = L.example_keys(jax.random.fold_in(jax.random.key(0), 0), jnp.arange(8))
        d = L.draw(keys, (8, 8, 4), cfg.schedule.n_steps, tc.step.caption_dropout)
        return L.posterior_sample(sd.encode_moments(params, images), d.posterior_eps, cfg.latent_scale), d

    z0, d = draws(sd.params, rows["images"])
    assert 0 < int(d.drop.sum()) < 8

    # torch: labml U-Net and transformers' CLIPTextModel with the same weights, both differentiated.
    ref = build(cfg, params_to_state_dict(params0), ("unet", "text_encoder"))
    unet, clip = ref["unet"], ref["text_encoder"]
    x_t, eps, t = torch_q_sample(z0, d.noise, d.t)
    ctx = clip(input_ids=torch.from_numpy(np.asarray(ids, np.int64))).last_hidden_state
    uncond = clip(input_ids=torch.from_numpy(np.asarray(empty, np.int64))).last_hidden_state
    ctx = torch.where(torch.from_numpy(np.array(d.drop))[:, None, None], uncond.expand_as(ctx), ctx)
    loss = torch.nn.functional.mse_loss(eps, unet(x_t, t, ctx))
    loss.backward()

    def as_flax(component, prefix, named):
        sd_ = {prefix + k: v.detach().numpy() for k, v in named}
        return state_dict_to_params(sd_, abstract_params(cfg, (component,)))[0][component]

    torch_text_grads = as_flax("text_encoder", "cond_stage_model.transformer.",
                               ((k, p.grad) for k, p in clip.named_parameters()))
    mu = components(optax.tree_utils.tree_get(new.opt_state, "mu"), tc.step)
    jax_grads = jax.tree_util.tree_map(lambda x: np.asarray(x) / (1.0 - tc.optim.b1), mu)
    assert rel_err(m["loss"], loss.item()) <= 1e-4
    assert rel_err(_flat(jax_grads["text_encoder"]), _flat(torch_text_grads)) <= 1e-4
    assert np.abs(_flat(torch_text_grads)).max() > 1e-6  # the caption reaches the loss
    new_params = components(_tree(new.params), tc.step)
    for c in ("unet", "text_encoder"):  # both components moved
        assert rel_err(_flat(new_params[c]), _flat(params0[c])) > 1e-4, c


def test_train_resume_export_with_the_text_encoder(data, tmp_path, capsys):
    import ldm_jax
    from ldm_jax.train.checkpoint import Checkpoints
    from ldm_jax.train.base import load_base

    run = tmp_path / "run"
    plain = ["train", *COMMON, "--data", data, "--out", str(run), "--precompute-latents", "--save-every", "2"]
    args = plain + TEXT
    assert main([*args, "--steps", "2"]) == 0
    assert not (run / "latent_cache" / "ctx.npy").exists()  # only the frozen VAE's moments are cached
    capsys.readouterr()
    assert main([*plain, "--steps", "4", "--resume"]) == 2  # without the flag: one clear line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "started with --train-text-encoder" in err[0], err
    assert main([*args, "--steps", "4", "--resume", "--export", "ema"]) == 0
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]

    with Checkpoints(run / "checkpoints") as ck:
        tree = ck.restore(None)[0]
        assert json.loads(json.dumps(ck.read_meta(4)))["step_config"]["train_text_encoder"] is True
    model, base = ldm_jax.load(run / "model"), load_base(None, "tiny", 0)
    assert set(tree["ema_params"]) == {"unet", "text_encoder"}
    for c in ("unet", "text_encoder"):
        assert rel_err(_flat(_tree(model.params[c])), _flat(_tree(tree["ema_params"][c]))) == 0.0, c
        assert rel_err(_flat(_tree(model.params[c])), _flat(_tree(base.params[c]))) > 1e-5, c
    assert rel_err(_flat(_tree(model.params["vae"])), _flat(_tree(base.params["vae"]))) == 0.0  # frozen
    # --export-only reads the setting from the checkpoint: the raw text encoder this time
    assert main(["train", "--export-only", "--preset", "tiny", "--out", str(run), "--export", "raw"]) == 0
    raw = ldm_jax.load(run / "model")
    assert rel_err(_flat(_tree(raw.params["text_encoder"])), _flat(_tree(tree["params"]["text_encoder"]))) == 0.0
