"""The latent U-Net eps_theta(x_t, t, c) of Stable Diffusion.

Mirrors labml `stable_diffusion/model/unet.py` (CompVis `ldm/modules/diffusionmodules/openaimodel.py`),
with the same block names so that checkpoints map by a fixed rule: `input_blocks.1.0.in_layers.2.weight`
<-> `input_blocks_1_0/in_layers_2/kernel`. NHWC; params fp32; compute in `dtype`.

Sizes: each level halves h, w with a stride-2 conv (ceil(h/2)); each upsampler returns to the size of the
skip connection it meets (as diffusers' `upsample_size`), so latents need not be divisible by 8.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ldm_jax.configs import UNetConfig
from ldm_jax.models.attention import SpatialTransformer
from ldm_jax.models.layers import Dtype, GroupNorm, conv, dense, upsample_nearest


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding of t [B] -> [B, dim] = cat[cos(t f_i), sin(t f_i)], f_i = exp(-ln(P) i / half)."""
    half = dim // 2
    # Constant frequencies: the fp32 exponent as torch forms it, exponentiated in float64 and rounded once
    # (closer to torch's fp32 exp than XLA's; the error grows with t up to 999 in cos/sin arguments).
    expo = (-math.log(max_period) * np.arange(half, dtype=np.float32) / half).astype(np.float32)
    freqs = np.exp(expo.astype(np.float64)).astype(np.float32)
    args = t.astype(jnp.float32)[:, None] * freqs[None]  # [B, half]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class ResBlock(nn.Module):
    """h = conv(silu(GN(x))) + W silu(t_emb); h = conv(silu(GN(h))); return skip(x) + h. GN eps 1e-5."""

    out_channels: int
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, t_emb):
        c_out = self.out_channels
        h = GroupNorm(self.norm_groups, 1e-5, dtype=self.dtype, name="in_layers_0")(x)
        h = conv(c_out, 3, padding=1, name="in_layers_2", dtype=self.dtype)(nn.silu(h))
        e = dense(c_out, name="emb_layers_1", dtype=self.dtype)(nn.silu(t_emb))  # [B, C_out]
        h = h + e[:, None, None, :]
        h = GroupNorm(self.norm_groups, 1e-5, dtype=self.dtype, name="out_layers_0")(h)
        h = conv(c_out, 3, padding=1, name="out_layers_3", dtype=self.dtype)(nn.silu(h))
        skip = x if x.shape[-1] == c_out else conv(c_out, 1, name="skip_connection", dtype=self.dtype)(x)
        return skip + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv `op` with symmetric padding 1 (not 'SAME')."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return conv(x.shape[-1], 3, stride=2, padding=1, name="op", dtype=self.dtype)(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to `size` (default 2x), then a 3x3 conv `conv`."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, size=None):
        if size is None or tuple(size) == (2 * x.shape[1], 2 * x.shape[2]):  # exactly 2x: sub-pixel form
            return conv(x.shape[-1], 3, padding=1, name="conv", dtype=self.dtype, upsample=True)(x)
        return conv(x.shape[-1], 3, padding=1, name="conv", dtype=self.dtype)(upsample_nearest(x, size))


class UNetModel(nn.Module):
    """eps_theta(x [B, h, w, C_in], t int [B], cond [B, S, d_cond], y [B, adm_in_channels] or None) -> [B, h, w, C_out]
    (fp32). y, SDXL's vector conditioning, is given iff `config.adm_in_channels` > 0; it is added to the time
    embedding through `label_emb` (sgm `openaimodel.UNetModel`, num_classes="sequential")."""

    config: UNetConfig
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat: bool = False  # rematerialise ResBlocks and transformers in the backward pass (training)

    @nn.compact
    def __call__(self, x, t, cond, y=None):
        cfg, dt = self.config, self.dtype
        res_cls = nn.remat(ResBlock) if self.remat else ResBlock
        st_cls = nn.remat(SpatialTransformer) if self.remat else SpatialTransformer

        def res(c_out, name):
            return res_cls(c_out, cfg.norm_groups, dtype=dt, name=name)

        def transformer(c, level, name):
            n_heads, d_head = cfg.heads_for(c)
            return st_cls(n_heads, d_head, cfg.tf_layers_at(level), cfg.use_linear_proj, cfg.norm_groups, dtype=dt,
                          attention_impl=self.attention_impl, name=name)

        c = cfg.channels
        t_emb = timestep_embedding(t, c).astype(dt)  # [B, c]
        t_emb = dense(4 * c, name="time_embed_0", dtype=dt)(t_emb)
        t_emb = dense(4 * c, name="time_embed_2", dtype=dt)(nn.silu(t_emb))  # [B, 4c]
        if (y is None) != (cfg.adm_in_channels == 0):
            raise ValueError(f"this U-Net takes a vector conditioning y of width {cfg.adm_in_channels} (SDXL)"
                             if y is None else "y given to a U-Net without vector conditioning (adm_in_channels 0)")
        if y is not None:  # emb = time_embed(t) + label_emb(y)
            e = dense(4 * c, name="label_emb_0_0", dtype=dt)(y.astype(dt))
            t_emb = t_emb + dense(4 * c, name="label_emb_0_2", dtype=dt)(nn.silu(e))
        cond = cond.astype(dt)

        levels = len(cfg.channel_multipliers)
        h = conv(c, 3, padding=1, name="input_blocks_0_0", dtype=dt)(x.astype(dt))
        skips = [h]
        block = 1
        for level, mult in enumerate(cfg.channel_multipliers):
            for _ in range(cfg.n_res_blocks):
                h = res(c * mult, f"input_blocks_{block}_0")(h, t_emb)
                if level in cfg.attention_levels:
                    h = transformer(c * mult, level, f"input_blocks_{block}_1")(h, cond)
                skips.append(h)
                block += 1
            if level != levels - 1:
                h = Downsample(dtype=dt, name=f"input_blocks_{block}_0")(h)
                skips.append(h)
                block += 1

        ch = c * cfg.channel_multipliers[-1]
        h = res(ch, "middle_block_0")(h, t_emb)
        h = transformer(ch, levels - 1, "middle_block_1")(h, cond)
        h = res(ch, "middle_block_2")(h, t_emb)

        block = 0
        for level in reversed(range(levels)):
            ch = c * cfg.channel_multipliers[level]
            for j in range(cfg.n_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res(ch, f"output_blocks_{block}_0")(h, t_emb)
                idx = 1
                if level in cfg.attention_levels:
                    h = transformer(ch, level, f"output_blocks_{block}_{idx}")(h, cond)
                    idx += 1
                if level != 0 and j == cfg.n_res_blocks:
                    h = Upsample(dtype=dt, name=f"output_blocks_{block}_{idx}")(h, skips[-1].shape[1:3])
                block += 1

        h = GroupNorm(cfg.norm_groups, 1e-5, dtype=dt, name="out_0")(h)
        h = conv(cfg.out_channels, 3, padding=1, name="out_2", dtype=dt)(nn.silu(h))
        return h.astype(jnp.float32)
