"""Small layers shared by the U-Net, the autoencoder and the text encoder.

Semantics follow torch (labml / CompVis): GroupNorm statistics in fp32 with a biased variance,
convolutions with explicit symmetric padding, nearest-neighbour upsampling by index (`F.interpolate`
mode="nearest"). Parameters are fp32; `dtype` is the compute dtype. Layout is NHWC.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _normalize(module: nn.Module, x, axes, reshape, epsilon: float, dtype):
    """(x - mean) / sqrt(var + eps) * scale + bias with two-pass fp32 statistics (biased variance, as torch)
    over `axes` of x reshaped to `reshape`; params `scale` / `bias` are [C] (CompVis `weight` / `bias`)."""
    c = x.shape[-1]
    scale = module.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = module.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    g = x.astype(jnp.float32).reshape(reshape)
    mean = g.mean(axis=axes, keepdims=True)
    var = jnp.square(g - mean).mean(axis=axes, keepdims=True)
    g = (g - mean) * jax.lax.rsqrt(var + epsilon)
    return (g.reshape(x.shape) * scale + bias).astype(dtype)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm on NHWC (or [B, L, C]) inputs; statistics over (positions, channels of a group)."""

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        shape = (x.shape[0], -1, self.num_groups, c // self.num_groups)  # [B, HW, G, C/G]
        return _normalize(self, x, (1, 3), shape, self.epsilon, self.dtype)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last axis."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _normalize(self, x, (-1,), x.shape, self.epsilon, self.dtype)


def conv(features: int, kernel: int, *, stride: int = 1, padding: int | tuple = 0, name: str, dtype: Dtype):
    """nn.Conv2d(k, stride, padding) in NHWC; `padding` an int (symmetric) or explicit pairs."""
    pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype,
                   param_dtype=jnp.float32, name=name)


def dense(features: int, *, use_bias: bool = True, name: str, dtype: Dtype):
    """nn.Linear: kernel [in, out] (torch stores [out, in])."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def upsample_nearest(x, size: tuple[int, int] | None = None):
    """F.interpolate(mode="nearest") to `size` (default 2x): src index = floor(dst * in / out)."""
    b, h, w, c = x.shape
    oh, ow = size if size is not None else (2 * h, 2 * w)
    if (oh, ow) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = jnp.minimum(jnp.floor(jnp.arange(oh) * (h / oh)).astype(jnp.int32), h - 1)
    cols = jnp.minimum(jnp.floor(jnp.arange(ow) * (w / ow)).astype(jnp.int32), w - 1)
    return x[:, rows][:, :, cols]
