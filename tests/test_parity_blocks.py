"""Per-block parity against the torch reference (labml U-Net / autoencoder blocks, transformers CLIP layer).

fp32 on CPU, highest matmul precision; measure max|jax - torch| / max|torch| <= 1e-5 (DESIGN.md §5).
Weights: torch's random init, every tensor perturbed, passed through the real key table and layout rules.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from labml_nn.diffusion.stable_diffusion.model import autoencoder as tae
from labml_nn.diffusion.stable_diffusion.model import unet as tunet
from labml_nn.diffusion.stable_diffusion.model import unet_attention as tattn

from ldm_jax.configs import TextEncoderConfig
from ldm_jax.models import attention as attn
from ldm_jax.models import autoencoder as vae
from ldm_jax.models import clip_text, layers, unet
from tests.parity import flax_params_for, nchw, nhwc, perturb_, rel_err

TOL = 1e-5
rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def check(torch_module, flax_module, torch_inputs, flax_inputs, to_nhwc=True):
    params = flax_params_for(torch_module, flax_module, *flax_inputs)
    with torch.no_grad():
        ref = torch_module(*torch_inputs)
    ref = nhwc(ref) if to_nhwc else ref.numpy()
    out = flax_module.apply({"params": params}, *flax_inputs)
    assert out.shape == ref.shape
    err = rel_err(out, ref)
    assert err <= TOL, err
    return err


@pytest.mark.parametrize("steps,tol", [([0, 1, 10, 50], TOL), ([0, 1, 10, 500, 999], 1e-4)])
def test_time_embedding(steps, tol):
    """cat[cos(t f), sin(t f)]. torch's fp32 exp is off by one ulp for some f_i (ours is correctly rounded);
    t * f amplifies that to ~3e-5 at t = 999 (one ulp of an argument near 421), hence 1e-4 there."""
    m = tunet.UNetModel(in_channels=4, out_channels=4, channels=64, n_res_blocks=1, attention_levels=[],
                        channel_multipliers=[1], n_heads=1)
    t = torch.tensor(steps)
    ref = m.time_step_embedding(t).numpy()
    assert rel_err(unet.timestep_embedding(jnp.asarray(t.numpy()), 64), ref) <= tol


@pytest.mark.parametrize("c_in,c_out", [(64, 64), (64, 96)])
def test_resblock(c_in, c_out):
    x, emb = randn(2, 8, 6, c_in), randn(2, 128)
    tm = perturb_(tunet.ResBlock(c_in, 128, out_channels=c_out))
    check(tm, unet.ResBlock(c_out), (nchw(x), torch.from_numpy(emb)), (x, emb))


def test_downsample_upsample():
    x = randn(2, 8, 6, 32)
    check(perturb_(tunet.DownSample(32)), unet.Downsample(), (nchw(x),), (x,))
    check(perturb_(tunet.UpSample(32)), unet.Upsample(), (nchw(x),), (x,))


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (2, ((0, 1), (0, 1)))])
@pytest.mark.parametrize("positions", ["im2col", "xla"])
def test_conv_paths_match_torch(stride, padding, positions):
    """Conv2d's CPU im2col path (few output positions, >= 256 input channels) and XLA's convolution both equal
    torch's Conv2d; the compiled program shows which one ran."""
    hw = 5 if positions == "im2col" else 24  # 2 x 5 x 5 = 50 positions; 2 x 24 x 24 = 1152 > 256
    x = randn(2, hw, hw, 256)
    tm = perturb_(torch.nn.Conv2d(256, 32, 3, stride=stride))
    fm = layers.conv(32, 3, stride=stride, padding=padding, name="c", dtype=jnp.float32)
    tx = nchw(x)
    if padding == 1:
        tm.padding = (1, 1)
    else:
        tx = torch.nn.functional.pad(tx, (0, 1, 0, 1))
    params = flax_params_for(tm, fm, x)
    with torch.no_grad():
        ref = nhwc(tm(tx))
    out = fm.apply({"params": params}, x)
    assert out.shape == ref.shape and rel_err(out, ref) <= TOL
    hlo = jax.jit(fm.apply).lower({"params": params}, x).compile().as_text()
    assert ("convolution(" in hlo) == (positions == "xla")


@pytest.mark.parametrize("per_head", [False, True], ids=["batched", "per-head"])
@pytest.mark.parametrize("self_attention", [True, False])
def test_cross_attention(self_attention, per_head, monkeypatch):
    """per-head: the CPU's head-by-head path (used above _CPU_PER_HEAD_LOGITS) forced on at this small size."""
    if per_head:
        monkeypatch.setattr(attn, "_CPU_PER_HEAD_LOGITS", 0)
    x, cond = randn(2, 24, 64), randn(2, 77, 48)
    d_cond = 64 if self_attention else 48
    tm = perturb_(tattn.CrossAttention(64, d_cond, n_heads=4, d_head=16, is_inplace=False))
    fm = attn.CrossAttention(n_heads=4, d_head=16)
    if self_attention:
        check(tm, fm, (torch.from_numpy(x),), (x,), to_nhwc=False)
    else:
        check(tm, fm, (torch.from_numpy(x), torch.from_numpy(cond)), (x, cond), to_nhwc=False)


def test_basic_transformer_block():
    x, cond = randn(2, 24, 64), randn(2, 77, 48)
    tm = perturb_(tattn.BasicTransformerBlock(64, 4, 16, d_cond=48))
    check(tm, attn.BasicTransformerBlock(4, 16), (torch.from_numpy(x), torch.from_numpy(cond)), (x, cond),
          to_nhwc=False)


@pytest.mark.parametrize("depth", [1, 2])
def test_spatial_transformer(depth):
    x, cond = randn(2, 6, 10, 64), randn(2, 77, 48)
    tm = perturb_(tattn.SpatialTransformer(64, 4, depth, 48))
    check(tm, attn.SpatialTransformer(4, 16, depth), (nchw(x), torch.from_numpy(cond)), (x, cond))


@pytest.mark.parametrize("c_in,c_out", [(64, 64), (64, 32)])
def test_vae_resnet_block(c_in, c_out):
    x = randn(2, 8, 6, c_in)
    check(perturb_(tae.ResnetBlock(c_in, c_out)), vae.ResnetBlock(c_out), (nchw(x),), (x,))


def test_vae_attn_block():
    x = randn(2, 8, 6, 64)
    check(perturb_(tae.AttnBlock(64)), vae.AttnBlock(), (nchw(x),), (x,))


def test_vae_attn_block_chunked(monkeypatch):
    """The memory-efficient (query-chunked) path gives the same result as torch."""
    monkeypatch.setattr(attn, "_MAX_LOGITS", 2 * 48 * 12)  # forces 4 chunks of 12 queries
    x = randn(2, 8, 6, 32)
    check(perturb_(tae.AttnBlock(32)), vae.AttnBlock(), (nchw(x),), (x,))


def test_vae_attn_block_per_head_chunked(monkeypatch):
    """The CPU's head-by-head path with its queries chunked within a head gives the same result as torch."""
    monkeypatch.setattr(attn, "_CPU_PER_HEAD_LOGITS", 0)
    monkeypatch.setattr(attn, "_MAX_LOGITS", 48 * 12)  # per head: 4 chunks of 12 queries
    x = randn(2, 8, 6, 32)
    check(perturb_(tae.AttnBlock(32)), vae.AttnBlock(), (nchw(x),), (x,))


def test_vae_down_up_sample():
    x = randn(2, 8, 6, 32)
    check(perturb_(tae.DownSample(32)), vae._ResampleConv(32, 2), (torch.nn.functional.pad(nchw(x), (0, 1, 0, 1)),),
          (np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))),))
    x = randn(2, 8, 16, 32)  # 256 positions: the sub-pixel form
    check(perturb_(tae.UpSample(32)), vae._ResampleConv(32, 1), (nchw(x),), (x,))


@pytest.mark.parametrize("hw", [(8, 16), (3, 5)], ids=["sub-pixel", "small-input"])
@pytest.mark.parametrize("channels", [32, 256])
def test_upsample_conv_matches_torch(channels, hw):
    """Upsample's 2x path: from 256 input positions on (2 x 8 x 16) it never forms the upsampled input (four 2x2
    convolutions of the input, interleaved; with 256 channels each takes the CPU's im2col path too); below, it
    upsamples then convolves. The compiled program shows which."""
    x = randn(2, *hw, channels)
    check(perturb_(tunet.UpSample(channels)), unet.Upsample(), (nchw(x),), (x,))
    up = unet.Upsample()
    hlo = jax.jit(up.apply).lower(up.init(jax.random.key(0), x), x).as_text()
    # XLA convolutions: 4 (one per output parity) in the sub-pixel form, 1 after upsampling; 0 on im2col paths
    assert hlo.count("stablehlo.convolution") == (0 if channels == 256 else 4 if hw == (8, 16) else 1)


def test_upsample_to_a_size_that_is_not_2x_uses_nearest_then_conv():
    """Odd skip sizes (latents not divisible by 8): nearest to the skip's size, then the same 3x3 conv."""
    x = jnp.asarray(randn(1, 3, 4, 16))
    up = unet.Upsample()
    params = up.init(jax.random.key(0), x)
    conv = layers.conv(16, 3, padding=1, name="conv", dtype=jnp.float32)
    want = conv.apply({"params": params["params"]["conv"]}, layers.upsample_nearest(x, (5, 7)))
    np.testing.assert_allclose(up.apply(params, x, (5, 7)), want, rtol=1e-6, atol=1e-6)


def test_upsample_to_odd_size_matches_torch_nearest():
    x = randn(1, 3, 5, 2)
    ref = torch.nn.functional.interpolate(nchw(x), size=(5, 9), mode="nearest")
    from ldm_jax.models.layers import upsample_nearest

    np.testing.assert_array_equal(np.asarray(upsample_nearest(jnp.asarray(x), (5, 9))), nhwc(ref))


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_encoder_layer(act):
    from transformers import CLIPTextConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    hf = CLIPTextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, hidden_act=act,
                        attn_implementation="eager")
    tm = perturb_(CLIPEncoderLayer(hf))
    cfg = TextEncoderConfig(hidden_size=64, intermediate_size=128, num_heads=4, hidden_act=act)
    x = randn(2, 77, 64)
    causal = torch.full((77, 77), float("-inf")).triu(1)[None, None].expand(2, 1, 77, 77)

    def torch_layer(h):
        out = tm(h, attention_mask=None, causal_attention_mask=causal) if _takes_causal(tm) else tm(h, causal)
        return out[0] if isinstance(out, tuple) else out

    params = flax_params_for(tm, clip_text.CLIPEncoderLayer(cfg), x)
    with torch.no_grad():
        ref = torch_layer(torch.from_numpy(x)).numpy()
    assert rel_err(clip_text.CLIPEncoderLayer(cfg).apply({"params": params}, x), ref) <= TOL


def _takes_causal(layer) -> bool:
    import inspect

    return "causal_attention_mask" in inspect.signature(layer.forward).parameters


def test_linear_and_conv_keep_flax_parameters_and_check_shapes():
    """layers.Linear / Conv2d replace flax's Dense / Conv (whose per-trace shape check costs an eval_shape per
    parameter): same parameter names, shapes and initial values, same outputs, and a wrong shape is an error
    that names the parameter."""
    import flax.linen as nn

    x = jnp.asarray(randn(2, 6, 6, 16))
    for ours, theirs in ((layers.Linear(8), nn.Dense(8)),
                         (layers.Conv2d(8, 3, padding=((1, 1), (1, 1))), nn.Conv(8, (3, 3), padding=((1, 1), (1, 1))))):
        p_ours, p_theirs = ours.init(jax.random.key(0), x), theirs.init(jax.random.key(0), x)
        assert jax.tree_util.tree_structure(p_ours) == jax.tree_util.tree_structure(p_theirs)
        for a, b in zip(jax.tree_util.tree_leaves(p_ours), jax.tree_util.tree_leaves(p_theirs)):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(ours.apply(p_ours, x), theirs.apply(p_theirs, x), rtol=1e-6, atol=1e-6)
    bad = {"params": {"kernel": jnp.zeros((15, 8)), "bias": jnp.zeros((8,))}}
    with pytest.raises(ValueError, match=r"kernel has shape \(15, 8\), the module needs \(16, 8\)"):
        layers.Linear(8).apply(bad, x)


@pytest.mark.parametrize("offset", [0.0, 3.0, 1e4])
def test_one_pass_norm_statistics_hold_for_large_means(offset):
    """16-bit inputs take one-pass statistics shifted by each group's first element: exact to fp32 rounding of
    the spread even when |mean| is 10^4 standard deviations (where plain E[x^2] - E[x]^2 loses every digit)."""
    g = jnp.asarray((offset + randn(2, 256, 4, 8) * np.linspace(0.5, 2.0, 4)[:, None]).astype(np.float32))
    mean, var = layers._moments_one_pass(g, (1, 3))
    g64 = np.asarray(g, np.float64)
    np.testing.assert_allclose(mean, g64.mean(axis=(1, 3), keepdims=True), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(var, g64.var(axis=(1, 3), keepdims=True), rtol=1e-4)
    if offset >= 1e4:  # the shift is what holds it: unshifted, the variance is lost to cancellation
        plain = jnp.square(g).mean(axis=(1, 3), keepdims=True) - jnp.square(g.mean(axis=(1, 3), keepdims=True))
        assert np.abs(np.asarray(plain) / g64.var(axis=(1, 3), keepdims=True) - 1).max() > 0.1


def test_group_and_layer_norm_of_bf16_inputs_match_fp32_statistics():
    """GroupNorm / LayerNorm of a bf16 input (one-pass statistics) equal the fp32 two-pass result on the same
    values up to the bf16 rounding of the output; fp32 inputs keep the two-pass path (torch parity above)."""
    x = jnp.asarray(randn(2, 8, 8, 64) * 3 + 1.5).astype(jnp.bfloat16)
    for norm in (layers.GroupNorm(32, 1e-5, dtype=jnp.bfloat16), layers.LayerNorm(dtype=jnp.bfloat16)):
        p = norm.init(jax.random.key(0), x)
        p = jax.tree_util.tree_map(lambda a: a + 0.1 * randn(*a.shape), p)
        got = np.asarray(norm.apply(p, x), np.float32)
        ref = np.asarray(norm.clone(dtype=jnp.float32).apply(p, x.astype(jnp.float32)))  # two-pass, fp32 input
        assert np.abs(got - ref).max() <= 2**-7 * np.abs(ref).max()


def test_exact_gelu_matches_torch_in_fp32_and_rounds_bf16_once():
    """`layers.gelu_exact` (GEGLU's and OpenCLIP's activation) is torch's F.gelu to fp32 rounding for fp32 inputs.
    For bf16 inputs it computes in fp32 and rounds once: every value within one bf16 step of GELU computed in
    float64 and rounded to bf16, and for |x| < 4 equal to it at least as often as torch's own bf16 F.gelu
    (99.8% against 98.8% on 2 CPU cores; jax.nn.gelu in bf16: 59.5%, up to 10 steps off)."""
    x = np.concatenate([np.linspace(-12, 12, 20001), np.random.default_rng(1).normal(0, 4, 10000)]).astype(np.float32)
    ref = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()  # erf in fp32 on both sides: few-ulp differences
    np.testing.assert_allclose(np.asarray(layers.gelu_exact(jnp.asarray(x))), ref, rtol=1e-6, atol=1e-5)
    xb = torch.from_numpy(x).to(torch.bfloat16)
    exact = torch.nn.functional.gelu(xb.double()).to(torch.bfloat16).float().numpy()
    theirs = torch.nn.functional.gelu(xb).float().numpy()
    ours = np.asarray(layers.gelu_exact(jnp.asarray(xb.float().numpy()).astype(jnp.bfloat16)), np.float32)
    assert np.all(np.abs(ours - exact) <= np.maximum(np.abs(exact) * 2**-8, 1e-5))
    body = np.abs(x) < 4  # beyond, 1 + erf cancels in fp32 on both sides: values below 1e-4, checked by the bound
    assert np.mean(ours[body] == exact[body]) >= np.mean(theirs[body] == exact[body])
