"""Small layers shared by the U-Net, the autoencoder and the text encoder.

Semantics follow torch (labml / CompVis): GroupNorm statistics in fp32 with a biased variance,
convolutions with explicit padding, nearest-neighbour upsampling by index (`F.interpolate` mode="nearest").
Parameters are fp32 (flax Dense/Conv names and inits); `dtype` is the compute dtype. Layout is NHWC.
Speed, same maths: on the CPU, small convolutions with wide inputs run as im2col matmuls; an upsampling 3x3
convolution runs in sub-pixel form on every backend (Conv2d).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def param(module: nn.Module, name: str, init, shape: tuple[int, ...]):
    """module.param(name, init, shape, fp32), with the shape check done directly: Flax's own check runs
    `jax.eval_shape` of the initialiser for every parameter on every trace (~1.1 s of a 3.2 s trace of SD 1.x's
    txt2img program on 2 cores), where the expected shape is already known here."""
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"parameter {'/'.join((*module.scope.path, name))} has shape {tuple(value.shape)}, "
                             f"the module needs {tuple(shape)}")
        return value
    return module.param(name, init, shape, jnp.float32)


def _moments(g, axes):
    """fp32 mean and biased variance of g over `axes` (keepdims), two passes: var = E[(g - mean)^2]."""
    mean = g.mean(axis=axes, keepdims=True)
    return mean, jnp.square(g - mean).mean(axis=axes, keepdims=True)


def _moments_one_pass(g, axes):
    """`_moments` from one fused reduction over d = g - s: mean = s + E[d], var = E[d^2] - E[d]^2, where s is
    each group's first element (so the cancellation is relative to the group's spread, not to |mean|: a data
    point lies within sqrt(n) standard deviations of its mean). One read of g instead of two reads and an fp32
    temporary (g - mean). Measured without the shift on an H200 (SD 1.x, bf16, txt2img): 1 image 0.393 -> 0.378 s,
    8 images 1.720 -> 1.705 s; the shift reads one element per group inside the same fusion (not re-measured)."""
    axes = tuple(a % g.ndim for a in axes)
    s = g[tuple(slice(0, 1) if a in axes else slice(None) for a in range(g.ndim))]
    d = g - s
    m1 = d.mean(axis=axes, keepdims=True)
    var = jnp.maximum(jnp.square(d).mean(axis=axes, keepdims=True) - jnp.square(m1), 0.0)
    return s + m1, var


def _normalize(module: nn.Module, x, axes, reshape, epsilon: float, dtype):
    """(x - mean) / sqrt(var + eps) * scale + bias with fp32 statistics (biased variance, as torch) over `axes`
    of x reshaped to `reshape`; params `scale` / `bias` are [C] (CompVis `weight` / `bias`). fp32 inputs take
    two-pass statistics (torch parity); 16-bit inputs the one-pass form, whose fp32 rounding (~2^-19 of the
    variance for a group's first element within a few standard deviations of its mean) is far below the 2^-9 of
    the bf16 values themselves."""
    c = x.shape[-1]
    scale = param(module, "scale", nn.initializers.ones, (c,))
    bias = param(module, "bias", nn.initializers.zeros, (c,))
    g = x.astype(jnp.float32).reshape(reshape)
    mean, var = (_moments_one_pass if jnp.dtype(x.dtype).itemsize < 4 else _moments)(g, axes)
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


# On the CPU, a k x k convolution with at most this many output positions (batch x height x width) and at least
# _IM2COL_MIN_CHANNELS input channels runs as one matmul over unfolded neighbourhoods (Conv2d docstring).
_IM2COL_MAX_POSITIONS = 256
_IM2COL_MIN_CHANNELS = 256
_IM2COL_BACKENDS = ("cpu",)  # where that pays (scripts/gpu_ab.py's im2col_small_convs tries the GPU)
# Conv2d(upsample=True) takes the sub-pixel form from this many input positions (batch x height x width) up; below
# it, summing the kernel taps costs more than the saved multiply-adds (SD 1.x 4x4x1280 at batch 2: 71 against
# 23 ms on 2 cores; 16x16x640: 45 against 81 ms).
_SUBPIXEL_MIN_POSITIONS = 256


def _conv_im2col(x, kernel, stride: int, padding):
    """The convolution as [B*oh*ow, kh*kw*C_in] @ [kh*kw*C_in, C_out]: the kh*kw shifted (strided) views of the
    padded input, concatenated on channels in HWIO order, against the kernel reshaped."""
    kh, kw, c_in, c_out = kernel.shape
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    oh, ow = (xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kw) // stride + 1
    cols = jnp.concatenate([xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
                            for i in range(kh) for j in range(kw)], axis=-1)  # [B, oh, ow, kh*kw*C_in]
    out = cols.reshape(-1, kh * kw * c_in) @ kernel.reshape(kh * kw * c_in, c_out)
    return out.reshape(x.shape[0], oh, ow, c_out)


def _conv(x, kernel, stride: int, padding):
    """XLA's convolution, or on the CPU for few output positions and wide inputs the im2col matmul."""
    kh, kw, c_in, _ = kernel.shape
    oh = (x.shape[1] + sum(padding[0]) - kh) // stride + 1
    ow = (x.shape[2] + sum(padding[1]) - kw) // stride + 1
    if (kh * kw > 1 and jax.default_backend() in _IM2COL_BACKENDS and x.shape[0] * oh * ow <= _IM2COL_MAX_POSITIONS
            and c_in >= _IM2COL_MIN_CHANNELS):
        return _conv_im2col(x, kernel, stride, padding)
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _upsample_conv3x3(x, kernel, dtype):
    """conv3x3(pad 1) of the 2x nearest-upsampled x without forming it (sub-pixel form): output pixel
    (2i + p, 2j + q) sees input rows {i-1: w_0, i: w_1 + w_2} for p = 0 and {i: w_0 + w_1, i+1: w_2} for p = 1
    (columns alike), so each of the four parities is a 2x2 convolution of x: 16 instead of 36 multiply-adds per
    input pixel and channel pair. The taps are summed in fp32, then cast to `dtype`. [B, h, w, C_in] ->
    [B, 2h, 2w, C_out]."""
    kernel = kernel.astype(jnp.float32)

    def taps(k, parity, axis):  # 3 taps along `axis` -> the parity's 2
        k0, k1, k2 = (jnp.take(k, i, axis=axis) for i in range(3))
        return jnp.stack([k0, k1 + k2] if parity == 0 else [k0 + k1, k2], axis=axis)

    rows = []
    for p in (0, 1):
        cols = []
        for q in (0, 1):
            k = taps(taps(kernel, p, 0), q, 1).astype(dtype)  # [2, 2, C_in, C_out]
            pad = ((1, 0) if p == 0 else (0, 1), (1, 0) if q == 0 else (0, 1))
            cols.append(_conv(x, k, 1, pad))
        rows.append(jnp.stack(cols, axis=3))  # [B, h, w, 2 (q), C_out]
    out = jnp.stack(rows, axis=2)  # [B, h, 2 (p), w, 2 (q), C_out]
    b, h, _, w, _, c = out.shape
    return out.reshape(b, 2 * h, 2 * w, c)


class Conv2d(nn.Module):
    """nn.Conv2d in NHWC with explicit padding; the parameters of flax.linen.Conv (`kernel` [kh, kw, C_in, C_out],
    LeCun-normal init; `bias` [C_out], zeros).

    On the CPU, small-spatial convolutions with wide inputs (<= 256 output positions, >= 256 input channels: SD
    1.x's 8x8 and 4x4 levels at 256x256) run as one matmul over unfolded neighbourhoods (im2col), 2-2.5x faster
    than XLA's CPU convolution there (8x8, 1280 -> 1280 channels, batch 2, 2 cores: 22 ms against 55 ms; torch
    35 ms); elsewhere XLA's convolution wins and is used, as on every other backend (cuDNN on GPU).

    upsample=True: the conv of F.interpolate(x, scale_factor=2, mode="nearest") (CompVis Upsample; 3x3, padding
    1), computed in sub-pixel form (`_upsample_conv3x3`, 2.25x fewer FLOPs; 2x faster on 2 CPU cores) for inputs
    of >= _SUBPIXEL_MIN_POSITIONS positions, by upsampling first below that."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: tuple = ((0, 0), (0, 0))
    dtype: Dtype = jnp.float32
    upsample: bool = False

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = param(self, "kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
        bias = param(self, "bias", nn.initializers.zeros, (self.features,))
        x, bias = x.astype(self.dtype), bias.astype(self.dtype)
        if self.upsample:
            if (k, self.stride, self.padding) != (3, 1, ((1, 1), (1, 1))):
                raise ValueError("upsample=True is the 3x3, stride 1, padding 1 convolution of CompVis' Upsample")
            if x.shape[0] * x.shape[1] * x.shape[2] >= _SUBPIXEL_MIN_POSITIONS:
                return _upsample_conv3x3(x, kernel, self.dtype) + bias
            x = upsample_nearest(x)  # tiny inputs: the four summed kernels would cost more than they save
        return _conv(x, kernel.astype(self.dtype), self.stride, self.padding) + bias


def conv(features: int, kernel: int, *, stride: int = 1, padding: int | tuple = 0, name: str, dtype: Dtype,
         upsample: bool = False):
    """nn.Conv2d(k, stride, padding) in NHWC; `padding` an int (symmetric) or explicit pairs; `upsample`: of the
    2x nearest-upsampled input (see Conv2d)."""
    pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else tuple(map(tuple, padding))
    return Conv2d(features, kernel, stride=stride, padding=pad, dtype=dtype, upsample=upsample, name=name)


class Linear(nn.Module):
    """nn.Linear on the last axis; the parameters of flax.linen.Dense (`kernel` [in, out], LeCun-normal init;
    `bias` [out], zeros; torch stores the weight [out, in])."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = param(self, "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (((x.ndim - 1,), (0,)), ((), ())))
        if self.use_bias:
            y = y + param(self, "bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y


def dense(features: int, *, use_bias: bool = True, name: str, dtype: Dtype):
    """nn.Linear: kernel [in, out] (torch stores [out, in])."""
    return Linear(features, use_bias=use_bias, dtype=dtype, name=name)


def gelu_exact(x):
    """GELU(x) = x Phi(x) = x (1 + erf(x / sqrt 2)) / 2, computed in fp32 and returned in x's dtype: torch's
    formula and its opmath for 16-bit inputs. `jax.nn.gelu(approximate=False)` uses erfc, whose two-branch
    polynomial and exp made SD 1.x's GEGLU fusions compute-bound on an H200 (~1.9 TB/s, 2.4 ms of a 34 ms
    8-image step); erf is one rational polynomial. GEGLU of two [2, 4096, 1280] halves on 2 CPU cores: 17.3 ms
    fp32 and 4.9 ms bf16, against 20.7 and 16.7 ms."""
    x32 = x.astype(jnp.float32)
    return (0.5 * x32 * (1.0 + jax.lax.erf(x32 * 0.7071067811865476))).astype(x.dtype)


def upsample_nearest(x, size: tuple[int, int] | None = None):
    """F.interpolate(mode="nearest") to `size` (default 2x): src index = floor(dst * in / out)."""
    b, h, w, c = x.shape
    oh, ow = size if size is not None else (2 * h, 2 * w)
    if (oh, ow) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = jnp.minimum(jnp.floor(jnp.arange(oh) * (h / oh)).astype(jnp.int32), h - 1)
    cols = jnp.minimum(jnp.floor(jnp.arange(ow) * (w / ow)).astype(jnp.int32), w - 1)
    return x[:, rows][:, :, cols]
