"""Scaled dot-product attention and the U-Net's SpatialTransformer.

Mirrors labml `stable_diffusion/model/unet_attention.py` (CompVis `ldm/modules/attention.py`):
SpatialTransformer = GroupNorm(eps 1e-6) -> proj_in -> BasicTransformerBlock x depth -> proj_out, + x;
BasicTransformerBlock = x + attn1(norm1 x); x + attn2(norm2 x, c); x + ff(norm3 x) with GEGLU
(Shazeer 2020, exact erf GELU). Attention is softmax(q k^T * d_head**-0.5) v, softmax in fp32.
"""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import Dtype, GroupNorm, LayerNorm, conv, dense, gelu_exact

# Above this many logits per attention call (B * heads * L_q * L_k), queries are processed in chunks so that
# the [L_q, L_k] matrix is never materialised whole (the VAE's 64x64 mid-block attention is 4096 x 4096).
_MAX_LOGITS = 2**27
# On the CPU, attention calls with at least this many logits run head by head (_attention_per_head); below it
# the one batched einsum is as fast or faster (SD 1.x cross-attention, 16x16 and 8x8 levels).
_CPU_PER_HEAD_LOGITS = 2**22


def _chunk_len(l_q: int, per_query: int) -> int:
    """Largest divisor of l_q whose chunk keeps the logits under _MAX_LOGITS."""
    target = max(1, _MAX_LOGITS // max(per_query, 1))
    for n in range(1, l_q + 1):
        if l_q % n == 0 and l_q // n <= target:
            return l_q // n
    return 1


def _attention_per_head(q, k, v, scale: float):
    """XLA attention one (image, head) at a time (`lax.map`), for the CPU: each [L_q, L_k] logits block stays
    in cache, where XLA's einsum over all heads streams a [B, H, L_q, L_k] tensor through memory several times
    (SD 1.x's 32x32-latent self-attention, 2 x 8 heads of 1024 tokens, 2 cores: 26 ms against 107 ms; torch's
    SDPA 23 ms). Same maths as jax.nn.dot_product_attention's XLA path: fp32 logits and softmax, probabilities
    cast to v's dtype. Queries are chunked within a head above _MAX_LOGITS."""
    b, l_q, h, d = q.shape
    l_k = k.shape[1]
    heads = lambda a: a.transpose(0, 2, 1, 3).reshape((b * h,) + a.shape[1:2] + a.shape[3:])  # [B*H, L, D]
    chunk = _chunk_len(l_q, l_k)

    def one_head(qkv):
        qh, kh, vh = qkv  # [L_q, D], [L_k, D], [L_k, D_v]

        def rows(qc):  # [chunk, D] -> [chunk, D_v]
            logits = jnp.einsum("td,sd->ts", qc, kh, preferred_element_type=jnp.float32) * jnp.float32(scale)
            return jax.nn.softmax(logits, axis=-1).astype(vh.dtype) @ vh

        if chunk == l_q:
            return rows(qh)
        return jax.lax.map(rows, qh.reshape(l_q // chunk, chunk, d)).reshape(l_q, -1)

    out = jax.lax.map(one_head, (heads(q), heads(k), heads(v)))  # [B*H, L_q, D_v]
    return out.reshape(b, h, l_q, -1).transpose(0, 2, 1, 3)


def _max_cudnn_head_dim() -> int:
    """cuDNN's fused attention takes d_head <= 256 on Hopper (compute capability 9.0) and later, <= 128 before."""
    cc = getattr(jax.devices()[0], "compute_capability", "0")
    try:
        major = int(str(cc).split(".")[0])
    except ValueError:
        major = 0
    return 256 if major >= 9 else 128


def _cudnn_ok(q, k) -> bool:
    """Whether `auto` tries cuDNN: GPU, fp16/bf16, d_head a multiple of 8 within cuDNN's limit (SD 1.x's heads
    are 40, 80 and 160 wide: all three on an H100/H200, the first two on an A100)."""
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= _max_cudnn_head_dim() and k.shape[1] >= 1)


def attention(q, k, v, *, scale: float, causal: bool = False, impl: str = "auto"):
    """softmax(q k^T * scale) v over heads.  q [B, L, H, D], k/v [B, S, H, D] -> [B, L, H, D].

    impl: "xla" (fp32 logits and softmax; query-chunked for long sequences; head by head for large calls on
    the CPU), "cudnn" (fused flash attention; GPU, fp16/bf16, d_head <= 128, or <= 256 on Hopper), or "auto"
    (cudnn where it applies, else xla; a shape cuDNN rejects falls back to xla with a warning, and `bench`
    reports how many fused calls a compiled program has).
    """
    if impl not in ("auto", "xla", "cudnn"):
        raise ValueError(f"unknown attention implementation {impl!r}")
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation="cudnn")
    if impl == "auto" and _cudnn_ok(q, k):
        try:  # shapes cuDNN's fused kernel rejects are reported at trace time: fall back to XLA
            return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError) as e:
            warnings.warn(f"cuDNN attention rejected q {q.shape} {q.dtype}, k {k.shape}: {e}; using XLA attention",
                          stacklevel=2)
    b, l_q, h, _ = q.shape
    if jax.default_backend() == "cpu" and not causal and b * h * l_q * k.shape[1] >= _CPU_PER_HEAD_LOGITS:
        return _attention_per_head(q, k, v, scale)
    chunk = _chunk_len(l_q, b * h * k.shape[1])
    if chunk == l_q or causal:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation="xla")
    qs = q.reshape(b, l_q // chunk, chunk, h, q.shape[-1]).swapaxes(0, 1)  # [n, B, chunk, H, D]
    out = jax.lax.map(
        lambda qc: jax.nn.dot_product_attention(qc, k, v, scale=scale, implementation="xla"), qs)
    return out.swapaxes(0, 1).reshape(q.shape[:-1] + (v.shape[-1],))


class CrossAttention(nn.Module):
    """Multi-head attention of x [B, L, d_model] over cond [B, S, d_cond] (self-attention if cond is None)."""

    n_heads: int
    d_head: int
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, cond=None):
        d_attn = self.n_heads * self.d_head
        ctx = x if cond is None else cond.astype(self.dtype)
        q = dense(d_attn, use_bias=False, name="to_q", dtype=self.dtype)(x)
        k = dense(d_attn, use_bias=False, name="to_k", dtype=self.dtype)(ctx)
        v = dense(d_attn, use_bias=False, name="to_v", dtype=self.dtype)(ctx)
        heads = lambda a: a.reshape(a.shape[:2] + (self.n_heads, self.d_head))  # [B, L, H, D]
        out = attention(heads(q), heads(k), heads(v), scale=self.d_head**-0.5, impl=self.attention_impl)
        out = out.reshape(x.shape[:2] + (d_attn,))
        return dense(x.shape[-1], name="to_out_0", dtype=self.dtype)(out)


class GEGLU(nn.Module):
    """GEGLU(x) = (x W + b) * GELU(x V + c), one projection `proj` of width 2 * d_out."""

    d_out: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x, gate = jnp.split(dense(2 * self.d_out, name="proj", dtype=self.dtype)(x), 2, axis=-1)
        return x * gelu_exact(gate)


class FeedForward(nn.Module):
    """net = [GEGLU(d, 4d), Dropout, Linear(4d, d)] (names net_0, net_2 as CompVis)."""

    d_mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        h = GEGLU(d * self.d_mult, dtype=self.dtype, name="net_0")(x)
        return dense(d, name="net_2", dtype=self.dtype)(h)


class BasicTransformerBlock(nn.Module):
    n_heads: int
    d_head: int
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, cond):
        kw = dict(n_heads=self.n_heads, d_head=self.d_head, dtype=self.dtype, attention_impl=self.attention_impl)
        x = CrossAttention(**kw, name="attn1")(LayerNorm(dtype=self.dtype, name="norm1")(x)) + x
        x = CrossAttention(**kw, name="attn2")(LayerNorm(dtype=self.dtype, name="norm2")(x), cond) + x
        x = FeedForward(dtype=self.dtype, name="ff")(LayerNorm(dtype=self.dtype, name="norm3")(x)) + x
        return x


class SpatialTransformer(nn.Module):
    """Transformer over the h*w positions of a feature map, cross-attending to cond [B, S, d_cond]."""

    n_heads: int
    d_head: int
    depth: int = 1
    use_linear_proj: bool = False  # SD 1.x: 1x1 convs; SD 2.x: Linear (same maths, different weight layout)
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, cond):
        b, h, w, c = x.shape
        x_in = x
        x = GroupNorm(self.norm_groups, 1e-6, dtype=self.dtype, name="norm")(x)
        proj = (lambda name: dense(c, name=name, dtype=self.dtype)) if self.use_linear_proj else (
            lambda name: conv(c, 1, name=name, dtype=self.dtype))
        x = proj("proj_in")(x).reshape(b, h * w, c)  # [B, HW, C]
        for i in range(self.depth):
            x = BasicTransformerBlock(self.n_heads, self.d_head, dtype=self.dtype,
                                      attention_impl=self.attention_impl, name=f"transformer_blocks_{i}")(x, cond)
        x = proj("proj_out")(x.reshape(b, h, w, c))
        return x + x_in

