"""The CLIP text tower (Radford et al. 2021) that gives Stable Diffusion its context c.

Mirrors transformers' `CLIPTextModel` (`text_model.*`: token + position embeddings, pre-LN transformer
layers with a causal mask and quick_gelu MLPs, final LayerNorm), which CompVis' `FrozenCLIPEmbedder` wraps
for SD 1.x (ViT-L/14: 12 layers, width 768). Param names follow transformers so checkpoints map by rule.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.configs import TextEncoderConfig
from ldm_jax.models.attention import attention
from ldm_jax.models.layers import Dtype, LayerNorm, dense, gelu_exact

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": gelu_exact,
}


class CLIPAttention(nn.Module):
    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, l, d = x.shape
        d_head = d // self.num_heads
        heads = lambda a: a.reshape(b, l, self.num_heads, d_head)  # [B, L, H, D]
        q, k, v = (heads(dense(d, name=f"{n}_proj", dtype=self.dtype)(x)) for n in ("q", "k", "v"))
        out = attention(q, k, v, scale=d_head**-0.5, causal=True, impl="xla").reshape(b, l, d)
        return dense(d, name="out_proj", dtype=self.dtype)(out)


class CLIPEncoderLayer(nn.Module):
    """x + attn(ln1(x)); x + fc2(act(fc1(ln2(x))))."""

    config: TextEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.config, self.dtype
        x = x + CLIPAttention(cfg.num_heads, dt, name="self_attn")(
            LayerNorm(cfg.layer_norm_eps, dt, name="layer_norm1")(x))
        h = LayerNorm(cfg.layer_norm_eps, dt, name="layer_norm2")(x)
        h = _MLP(cfg, dt, name="mlp")(h)
        return x + h


class _MLP(nn.Module):
    config: TextEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        act = _ACTIVATIONS[self.config.hidden_act]
        h = act(dense(self.config.intermediate_size, name="fc1", dtype=self.dtype)(x))
        return dense(x.shape[-1], name="fc2", dtype=self.dtype)(h)


class _Embeddings(nn.Module):
    config: TextEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids):
        cfg = self.config
        tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=jnp.float32, name="token_embedding")(ids)
        pos = nn.Embed(cfg.max_length, cfg.hidden_size, dtype=jnp.float32, name="position_embedding")(
            jnp.arange(ids.shape[1]))
        return (tok + pos[None]).astype(self.dtype)


class _Encoder(nn.Module):
    config: TextEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        n = self.config.num_layers - self.config.skip_last_layers
        for i in range(self.config.num_layers):
            # Layers past the requested output are still created (they are part of the checkpoint) but
            # their results are discarded; XLA removes the dead computation.
            y = CLIPEncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x)
            x = y if i < n else x
        return x


class CLIPTextModel(nn.Module):
    """ids int32 [B, L] -> hidden states [B, L, hidden_size] (fp32), after the final LayerNorm."""

    config: TextEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids):
        cfg = self.config
        x = _Embeddings(cfg, self.dtype, name="embeddings")(ids)
        x = _Encoder(cfg, self.dtype, name="encoder")(x)
        return LayerNorm(cfg.layer_norm_eps, self.dtype, name="final_layer_norm")(x).astype(jnp.float32)
