"""Full-size SD 1.x parity (random weights, every tensor perturbed): <= 1e-4 per component (DESIGN.md §5).

Each component is built once in torch, perturbed in place, mapped through the real key table, and compared
on batch 2 with small non-square sizes and t in {0, 999}. The U-Net (kept for the DDIM chain) plus one other
component at a time keeps memory < ~12 GB.
"""

import gc

import jax
import numpy as np
import pytest
import torch

from convert import torch_reference
from convert.mapping import state_dict_to_params
from ldm_jax import configs
from ldm_jax.models.build import abstract_params
from ldm_jax.stable_diffusion import StableDiffusion
from tests.parity import nchw, nhwc, perturb_, rel_err

pytestmark = pytest.mark.slow
TOL = 1e-4
CFG = configs.sd1()


def load_component(component: str, seed: int):
    """(torch module, StableDiffusion holding only that component's params) with the same weights."""
    ref = perturb_(torch_reference.BUILDERS[component](CFG), seed=seed)
    prefix = torch_reference._prefix(component, ref)
    sd = {prefix + k: v.numpy() for k, v in ref.state_dict().items() if "position_ids" not in k}
    params, report = state_dict_to_params(sd, abstract_params(CFG, components=(component,)), place=jax.numpy.asarray)
    assert len(report.mapped) == len(sd)
    del sd
    gc.collect()
    return ref, StableDiffusion(CFG, params)


@pytest.fixture(scope="module")
def unet():
    """The full-size U-Net in torch and JAX, built once for the U-Net test and the DDIM chain (~20 s)."""
    return load_component("unet", seed=10)


def test_full_unet(unet):
    ref, model = unet
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 24, 4)).astype(np.float32)
    t = np.array([0, 999])
    ctx = rng.standard_normal((2, 77, 768)).astype(np.float32)
    with torch.no_grad():
        want = nhwc(ref(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)))
    err = rel_err(jax.jit(model.predict_noise)(model.params, x, t, ctx), want)
    print(f"full U-Net rel err {err:.2e}")
    assert err <= TOL


def test_full_vae():
    ref, model = load_component("vae", seed=11)
    rng = np.random.default_rng(1)
    img = rng.uniform(-1, 1, (2, 48, 64, 3)).astype(np.float32)
    z = rng.standard_normal((2, 6, 10, 4)).astype(np.float32)
    with torch.no_grad():
        mean = nhwc(ref.encode(nchw(img)).mean)
        dec = nhwc(ref.decode(nchw(z)))
    s = CFG.latent_scale
    enc_err = rel_err(jax.jit(model.encode_image)(model.params, img) / s, mean)
    dec_err = rel_err(jax.jit(model.decode_latents)(model.params, z * s), dec)
    print(f"full VAE rel err: encode {enc_err:.2e}, decode {dec_err:.2e}")
    assert enc_err <= TOL and dec_err <= TOL


def test_full_text_encoder():
    ref, model = load_component("text_encoder", seed=12)
    ids = model.tokenize(["a photograph of an astronaut riding a horse", ""])
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    err = rel_err(jax.jit(model.encode_text)(model.params, ids), want)
    print(f"full CLIP text encoder rel err {err:.2e}")
    assert err <= TOL


def test_full_ddim_txt2img_10_steps_matches_labml(unet):
    """DDIM (eta 0), CFG 7.5, 10 steps from the same x_T at full SD 1.x size: final latents <= 1e-3."""
    from tests.test_pipelines import PROMPTS, labml_ddim

    unet_ref, unet_model = unet
    clip_ref, clip = load_component("text_encoder", seed=14)
    model = StableDiffusion(CFG, {**unet_model.params, **clip.params})
    x_T = np.random.default_rng(2).standard_normal((2, 8, 16, 4)).astype(np.float32)
    import ldm_jax

    got = ldm_jax.txt2img(model, PROMPTS, steps=10, guidance_scale=7.5, height=64, width=128, latents=x_T,
                          output="latents")
    want = labml_ddim({"unet": unet_ref, "text_encoder": clip_ref}, model, PROMPTS, x_T, steps=10, scale=7.5)
    err = rel_err(got, want)
    print(f"full-size DDIM 10 steps rel err {err:.2e}")
    assert err <= 1e-3
