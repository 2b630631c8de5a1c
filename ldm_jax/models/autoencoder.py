"""The KL autoencoder (VAE, f=8) that maps images to the latent space of latent diffusion.

Mirrors labml `stable_diffusion/model/autoencoder.py` (CompVis `ldm/models/autoencoder.py` AutoencoderKL
and `ldm/modules/diffusionmodules/model.py` Encoder/Decoder). GroupNorm(32, eps 1e-6) everywhere; the
downsampler pads (0,1,0,1) then a VALID stride-2 conv; the mid-block attention is single-head over h*w.
The posterior is a diagonal Gaussian with log-variance clamped to [-30, 20].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.configs import AutoencoderConfig
from ldm_jax.models.attention import attention
from ldm_jax.models.layers import Dtype, GroupNorm, conv

_EPS = 1e-6


class ResnetBlock(nn.Module):
    out_channels: int
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c_out, dt = self.out_channels, self.dtype
        h = GroupNorm(self.norm_groups, _EPS, dtype=dt, name="norm1")(x)
        h = conv(c_out, 3, padding=1, name="conv1", dtype=dt)(nn.silu(h))
        h = GroupNorm(self.norm_groups, _EPS, dtype=dt, name="norm2")(h)
        h = conv(c_out, 3, padding=1, name="conv2", dtype=dt)(nn.silu(h))
        skip = x if x.shape[-1] == c_out else conv(c_out, 1, name="nin_shortcut", dtype=dt)(x)
        return skip + h


class AttnBlock(nn.Module):
    """x + proj_out(softmax(q k^T / sqrt(C)) v), one head over the h*w positions; q, k, v are 1x1 convs."""

    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        xn = GroupNorm(self.norm_groups, _EPS, dtype=self.dtype, name="norm")(x)
        qkv = [conv(c, 1, name=n, dtype=self.dtype)(xn).reshape(b, h * w, 1, c) for n in ("q", "k", "v")]
        out = attention(*qkv, scale=c**-0.5, impl=self.attention_impl).reshape(b, h, w, c)
        return x + conv(c, 1, name="proj_out", dtype=self.dtype)(out)


class Mid(nn.Module):
    """block_1 -> attn_1 -> block_2 at the lowest resolution."""

    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ResnetBlock(c, self.norm_groups, self.dtype, name="block_1")(x)
        x = AttnBlock(self.norm_groups, self.dtype, self.attention_impl, name="attn_1")(x)
        return ResnetBlock(c, self.norm_groups, self.dtype, name="block_2")(x)


class Level(nn.Module):
    """One resolution: `block_j` ResnetBlocks then an optional `downsample` / `upsample` conv."""

    out_channels: int
    n_blocks: int
    resample: str | None  # "down", "up" or None
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.n_blocks):
            x = ResnetBlock(self.out_channels, self.norm_groups, self.dtype, name=f"block_{j}")(x)
        c = x.shape[-1]
        if self.resample == "down":
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # F.pad(x, (0, 1, 0, 1))
            x = _ResampleConv(c, 2, self.dtype, name="downsample")(x)
        elif self.resample == "up":
            x = _ResampleConv(c, 1, self.dtype, name="upsample")(x)  # 2x nearest, then the conv (one op)
        return x


class _ResampleConv(nn.Module):
    """`downsample.conv` (3x3, stride 2, VALID after padding) or `upsample.conv` (3x3, padding 1, of the 2x
    nearest-upsampled input)."""

    features: int
    stride: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return conv(self.features, 3, stride=self.stride, padding=0 if self.stride == 2 else 1, name="conv",
                    dtype=self.dtype, upsample=self.stride == 1)(x)


class Encoder(nn.Module):
    """image [B, H, W, 3] -> moments features [B, H/f, W/f, 2 z_channels]."""

    config: AutoencoderConfig
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.config, self.dtype
        x = conv(cfg.channels, 3, padding=1, name="conv_in", dtype=dt)(x.astype(dt))
        n = len(cfg.channel_multipliers)
        for i, mult in enumerate(cfg.channel_multipliers):
            x = Level(cfg.channels * mult, cfg.n_resnet_blocks, "down" if i != n - 1 else None, cfg.norm_groups,
                      dt, name=f"down_{i}")(x)
        x = Mid(cfg.norm_groups, dt, self.attention_impl, name="mid")(x)
        x = GroupNorm(cfg.norm_groups, _EPS, dtype=dt, name="norm_out")(x)
        return conv(2 * cfg.z_channels, 3, padding=1, name="conv_out", dtype=dt)(nn.silu(x))


class Decoder(nn.Module):
    """z [B, h, w, z_channels] -> image [B, h*f, w*f, 3]; `up_i` run from the lowest resolution up."""

    config: AutoencoderConfig
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, z):
        cfg, dt = self.config, self.dtype
        mults = cfg.channel_multipliers
        x = conv(cfg.channels * mults[-1], 3, padding=1, name="conv_in", dtype=dt)(z.astype(dt))
        x = Mid(cfg.norm_groups, dt, self.attention_impl, name="mid")(x)
        for i in reversed(range(len(mults))):
            x = Level(cfg.channels * mults[i], cfg.n_resnet_blocks + 1, "up" if i != 0 else None, cfg.norm_groups,
                      dt, name=f"up_{i}")(x)
        x = GroupNorm(cfg.norm_groups, _EPS, dtype=dt, name="norm_out")(x)
        return conv(cfg.out_channels, 3, padding=1, name="conv_out", dtype=dt)(nn.silu(x))


class Autoencoder(nn.Module):
    """encode(img) -> moments [B, h, w, 2 emb_channels] (mean, logvar); decode(z) -> img. Outputs fp32."""

    config: AutoencoderConfig
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype, self.attention_impl)
        self.decoder = Decoder(cfg, self.dtype, self.attention_impl)
        self.quant_conv = conv(2 * cfg.emb_channels, 1, name="quant_conv", dtype=self.dtype)
        self.post_quant_conv = conv(cfg.z_channels, 1, name="post_quant_conv", dtype=self.dtype)

    def encode(self, img):
        return self.quant_conv(self.encoder(img)).astype(jnp.float32)

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z.astype(self.dtype))).astype(jnp.float32)

    def __call__(self, img):  # used by init: touches every parameter
        return self.decode(DiagonalGaussian(self.encode(img)).mode())


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, exp(logvar)), from moments [..., 2k] split on the last axis."""

    def __init__(self, moments):
        self.mean, logvar = jnp.split(moments, 2, axis=-1)
        self.logvar = jnp.clip(logvar, -30.0, 20.0)
        self.std = jnp.exp(0.5 * self.logvar)

    def sample(self, key):
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self):
        return self.mean
