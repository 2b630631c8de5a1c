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
        """-> (the output of layer L - skip_last_layers, the last layer's output)."""
        n = self.config.num_layers - self.config.skip_last_layers
        out = x
        for i in range(self.config.num_layers):
            # Layers past the requested output are still created (they are part of the checkpoint); unless the
            # pooled output reads the last layer, their results are unused and XLA removes the dead computation.
            x = CLIPEncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x)
            out = x if i < n else out
        return out, x


class CLIPTextModel(nn.Module):
    """ids int32 [B, L] -> hidden states [B, L, hidden_size] (fp32), after the final LayerNorm (unless read below the
    last layer with `norm_skipped_output` off, SDXL). With `pooled=True` also the pooled embedding
    [B, projection_dim]: the final-LayerNorm'd LAST layer's state at the first EOS token, through `text_projection`
    (OpenCLIP's `text.argmax` pooling, which finds the same token while EOS is the largest id; transformers'
    `CLIPTextModelWithProjection.text_embeds`)."""

    config: TextEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids, pooled: bool = False):
        cfg = self.config
        x = _Embeddings(cfg, self.dtype, name="embeddings")(ids)
        x, last = _Encoder(cfg, self.dtype, name="encoder")(x)
        final_norm = LayerNorm(cfg.layer_norm_eps, self.dtype, name="final_layer_norm")
        skipped = cfg.skip_last_layers > 0
        out = x if skipped and not cfg.norm_skipped_output else final_norm(x)
        if self.is_initializing():  # the checkpoint holds the final LayerNorm even where `out` skips it
            final_norm(last)
        proj = (dense(cfg.projection_dim, use_bias=False, name="text_projection", dtype=self.dtype)
                if cfg.projection_dim else None)
        if pooled and proj is None:
            raise ValueError("pooled=True needs a text encoder with a projection (projection_dim > 0)")
        if not pooled and not (proj is not None and self.is_initializing()):  # init creates text_projection
            return out.astype(jnp.float32)
        eos = jnp.argmax(ids == cfg.eos_token_id, axis=-1)  # [B] first EOS (0 if none)
        p = proj(final_norm(last)[jnp.arange(ids.shape[0]), eos]).astype(jnp.float32)  # [B, projection_dim]
        return (out.astype(jnp.float32), p) if pooled else out.astype(jnp.float32)
