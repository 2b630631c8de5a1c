"""SDXL's conditioning beyond the text context (Podell et al. 2023, "SDXL", section 2.2; sgm
`modules/encoders/modules.py`: `GeneralConditioner`, `ConcatTimestepEmbedderND`).

The U-Net's vector conditioning y [B, 2816] is, in the conditioner's order of embedders,

    y = [pooled text (OpenCLIP bigG, 1280), emb(original h, w), emb(crop top, left), emb(target h, w)]

where emb embeds each number on its own with the U-Net's sinusoidal time-step embedding (256 wide, cos then sin)
and the two of a pair sit side by side (512). Sizes are in pixels, (height, width), as diffusers' `add_time_ids`.
The refiner (`sd_xl_refiner.yaml`) has one text encoder (bigG) and y [B, 2560] =

    y = [pooled text (1280), emb(original h, w), emb(crop top, left), emb(aesthetic score)]

the score, a LAION aesthetics rating the refiner was trained with, 6.0 for the prompt and 2.5 for the negative
prompt at sampling (sgm's refiner demo, diffusers' `aesthetic_score` / `negative_aesthetic_score` defaults); the
refiner's empty negative prompt is encoded, not zeros (sgm's refiner demo zeroes nothing; diffusers' refiner
pipeline has `force_zeros_for_empty_prompt` off).

The two text encoders read the same prompt with different padding: CLIP ViT-L pads with EOS (transformers'
tokenizer), OpenCLIP bigG with 0; `repad` makes the second's ids from the first's on the device; `encode_text` runs
the encoder(s) of any model. Sampling (`pipelines.program`) passes original = target size and crop (0, 0); training
(`train.step`) passes each image's own numbers (`train.data.Example`).
"""

from __future__ import annotations

import jax.numpy as jnp

from ldm_jax.configs import SIZE_EMBED_DIM
from ldm_jax.models.unet import timestep_embedding

AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # the refiner's y at sampling: prompt, negative prompt


def size_embedding(sizes):
    """sizes [B, k] (numbers: pixel sizes, crop offsets) -> [B, k * 256]: each number's sinusoidal embedding."""
    sizes = jnp.asarray(sizes, jnp.float32)
    b, k = sizes.shape
    return timestep_embedding(sizes.reshape(-1), SIZE_EMBED_DIM).reshape(b, k * SIZE_EMBED_DIM)


def size_numbers(batch: int, target_hw, original_hw=None, crop_top_left=(0, 0)):
    """[B, 6] float32: original (h, w), crop (top, left), target (h, w); original defaults to the target (what
    diffusers and sgm's demo pass for a plain txt2img request)."""
    original_hw = target_hw if original_hw is None else original_hw
    row = jnp.asarray(tuple(original_hw) + tuple(crop_top_left) + tuple(target_hw), jnp.float32)
    return jnp.broadcast_to(row, (batch, 6))


def refiner_numbers(batch: int, size_hw, aesthetic_score: float, original_hw=None, crop_top_left=(0, 0)):
    """[B, 5] float32 for the refiner: original (h, w) (default: the image's size), crop (top, left), the score."""
    original_hw = size_hw if original_hw is None else original_hw
    row = jnp.asarray(tuple(original_hw) + tuple(crop_top_left) + (aesthetic_score,), jnp.float32)
    return jnp.broadcast_to(row, (batch, 5))


def vector_conditioning(pooled, sizes):
    """y = [pooled [B, P], size_embedding(sizes [B, k])] -> [B, P + k * 256] (fp32); k = 6 (SDXL) or 5 (refiner)."""
    return jnp.concatenate([pooled.astype(jnp.float32), size_embedding(sizes)], axis=-1)


def repad(ids, eos_token_id: int, pad_token_id: int):
    """ids int32 [B, L] padded any way after their first EOS -> the same tokens padded with pad_token_id."""
    pos = jnp.arange(ids.shape[1])[None]
    first_eos = jnp.argmax(ids == eos_token_id, axis=-1)[:, None]  # [B, 1]
    return jnp.where(pos > first_eos, jnp.int32(pad_token_id), ids)


def encode_text(mods: dict, config, params: dict, ids, pooled: bool = False):
    """ids int32 [B, L] -> the context c [B, L, d] (fp32 or the modules' dtype): the text encoder's states, or for
    SDXL both encoders' side by side [B, L, 768 + 1280], the second reading the ids re-padded with its pad token;
    `pooled=True` (SDXL only) returns (c, pooled [B, 1280]), the projected EOS state of the second encoder (the
    refiner: of its only one). mods: the
    model's modules (`models.build.modules`); params: {"text_encoder": ..., ["text_encoder_2": ...]}."""
    t2 = config.text_2
    if t2 is None:
        if pooled and not config.text.projection_dim:
            raise ValueError("pooled=True is for SDXL models (a projected text encoder: the base's second, the "
                             "refiner's only one)")
        return mods["text_encoder"].apply({"params": params["text_encoder"]}, ids, pooled=pooled)
    ctx = mods["text_encoder"].apply({"params": params["text_encoder"]}, ids)
    ids_2 = repad(ids, config.text.eos_token_id, t2.pad_token_id)
    ctx_2, pool = mods["text_encoder_2"].apply({"params": params["text_encoder_2"]}, ids_2, pooled=True)
    ctx = jnp.concatenate([ctx, ctx_2], axis=-1)
    return (ctx, pool) if pooled else ctx


def is_empty_prompt(ids, eos_token_id: int):
    """[B] bool: rows whose prompt is empty (BOS, then EOS). SDXL's unconditional side is then zeros rather than
    the encoding of "" (diffusers' `force_zeros_for_empty_prompt`, sgm's `force_uc_zero_embeddings=["txt"]`)."""
    return ids[:, 1] == eos_token_id
