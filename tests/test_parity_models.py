"""Whole-model parity at the tiny config, through the real file -> `ldm_jax.load` path.

A random torch model (every tensor perturbed) is saved as a CompVis .safetensors file, loaded with
`ldm_jax.load`, and every component is compared with the torch reference: <= 1e-5 (DESIGN.md §5).
"""

import numpy as np
import pytest
import torch

import ldm_jax
from convert import torch_reference
from convert.safetensors_io import write_safetensors
from ldm_jax import configs
from ldm_jax.loading import CONFIG_METADATA_KEY
from tests.parity import nchw, nhwc, rel_err

TOL = 1e-5


def save(tmp_path, state_dict, config, name="model.safetensors"):
    path = tmp_path / name
    write_safetensors(path, state_dict, {CONFIG_METADATA_KEY: config.to_json()})
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = configs.tiny()
    sd = torch_reference.random_state_dict(cfg, seed=1)
    path = save(tmp_path_factory.mktemp("tiny"), sd, cfg)
    return cfg, sd, ldm_jax.load(path), torch_reference.build(cfg, sd)


def test_config_comes_from_the_file(tiny):
    cfg, _, model, _ = tiny
    assert model.config == cfg
    assert set(model.params) == {"unet", "vae", "text_encoder"}


@pytest.mark.parametrize("t", [[0, 999], [500, 17]])
def test_unet(tiny, t):
    cfg, _, model, ref = tiny
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 24, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, cfg.unet.d_cond)).astype(np.float32)
    with torch.no_grad():
        want = nhwc(ref["unet"](nchw(x), torch.tensor(t), torch.from_numpy(ctx)))
    assert rel_err(model.predict_noise(model.params, x, np.array(t), ctx), want) <= TOL


def test_vae_encode_decode(tiny):
    cfg, _, model, ref = tiny
    rng = np.random.default_rng(1)
    img = rng.uniform(-1, 1, (2, 24, 40, 3)).astype(np.float32)
    with torch.no_grad():
        dist = ref["vae"].encode(nchw(img))
        mean = nhwc(dist.mean)
        z = rng.standard_normal((2, 12, 20, 4)).astype(np.float32)
        dec = nhwc(ref["vae"].decode(nchw(z)))
    s = cfg.latent_scale
    assert rel_err(model.encode_image(model.params, img) / s, mean) <= TOL
    assert rel_err(model.decode_latents(model.params, z * s), dec) <= TOL
    from ldm_jax.models.autoencoder import DiagonalGaussian

    post = DiagonalGaussian(model.encode_moments(model.params, img))
    assert rel_err(post.logvar, nhwc(dist.log_var)) <= TOL


def test_text_encoder(tiny):
    cfg, _, model, ref = tiny
    ids = model.tokenize(["a photo of a cat", "an astronaut riding a horse, detailed, 8k"])
    with torch.no_grad():
        want = ref["text_encoder"](input_ids=torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    assert rel_err(model.encode_text(model.params, ids), want) <= TOL


def test_text_encoder_penultimate_layer(tiny):
    """skip_last_layers=1 ("clip skip 2"): hidden state of layer L-1, then the final LayerNorm."""
    cfg, _, model, ref = tiny
    import dataclasses

    skip = model.replace(config=dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, skip_last_layers=1)))
    ids = model.tokenize(["a red circle"])
    with torch.no_grad():
        out = ref["text_encoder"](input_ids=torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
        tm = ref["text_encoder"]
        final_ln = (tm.text_model if hasattr(tm, "text_model") else tm).final_layer_norm  # transformers v4 / v5
        want = final_ln(out.hidden_states[-2]).numpy()
    assert rel_err(skip.encode_text(skip.params, ids), want) <= TOL


def test_inpainting_unet(tmp_path):
    cfg = configs.tiny()
    import dataclasses

    cfg = dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, in_channels=9))
    sd = torch_reference.random_state_dict(cfg, seed=2, components=("unet",))
    sd.update(torch_reference.random_state_dict(cfg, seed=3, components=("vae", "text_encoder")))
    model = ldm_jax.load(save(tmp_path, sd, cfg))
    assert model.config.is_inpainting
    ref = torch_reference.build(cfg, sd, components=("unet",))["unet"]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 8, 16, 9)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, cfg.unet.d_cond)).astype(np.float32)
    with torch.no_grad():
        want = nhwc(ref(nchw(x), torch.tensor([3, 900]), torch.from_numpy(ctx)))
    assert rel_err(model.predict_noise(model.params, x, np.array([3, 900]), ctx), want) <= TOL


def test_fp16_checkpoint_matches_torch_fed_the_same_rounded_weights(tmp_path):
    cfg = configs.tiny()
    sd16 = {k: v.astype(np.float16) for k, v in torch_reference.random_state_dict(cfg, seed=4).items()}
    model = ldm_jax.load(save(tmp_path, sd16, cfg))
    leaves = [x for p in model.params.values() for x in __import__("jax").tree_util.tree_leaves(p)]
    assert all(x.dtype == np.float32 for x in leaves)  # upcast on load
    ref = torch_reference.build(cfg, {k: v.astype(np.float32) for k, v in sd16.items()})
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, cfg.unet.d_cond)).astype(np.float32)
    with torch.no_grad():
        want = nhwc(ref["unet"](nchw(x), torch.tensor([250]), torch.from_numpy(ctx)))
    assert rel_err(model.predict_noise(model.params, x, np.array([250]), ctx), want) <= TOL
