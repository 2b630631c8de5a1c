"""`StableDiffusion`: a loaded model: its config, its parameter trees and pure functions over them.

The functions take params first so they can be jitted, pmapped and sharded (DESIGN.md §4):

    ids = sd.tokenize(prompts)                      # int32 [B, 77]
    ctx = sd.encode_text(sd.params, ids)            # [B, 77, d] last hidden state
    eps = sd.predict_noise(sd.params, x, t, ctx)    # x NHWC latents [B, h, w, 4], t int32 [B]
    # SDXL: ctx, pooled = sd.encode_text(sd.params, ids, pooled=True); y = sd.vector_conditioning(pooled, (H, W));
    #       eps = sd.predict_noise(sd.params, x, t, ctx, y)
    z   = sd.encode_image(sd.params, images)        # NHWC in [-1, 1] -> scaled posterior mean
    img = sd.decode_latents(sd.params, z)           # scaled latents -> NHWC in [-1, 1]

Textual inversion: `sd.add_tokens([(word, vectors)])` is a model whose prompts may use `word` for those learned
vectors (new rows of the token embedding; SDXL: vectors {"text_encoder": ..., "text_encoder_2": ...}, rows of both
encoders' at the same ids); `ldm_jax.load(..., embeddings=)` reads them from files (`convert.embeddings`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import cached_property
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.configs import ModelConfig
from ldm_jax.models.autoencoder import DiagonalGaussian
from ldm_jax.models.build import modules


_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "fp16": jnp.float16}


def as_dtype(name_or_dtype) -> Any:
    """A dtype name ("bf16", "float32", ...) or dtype -> its scalar type; only float32, bfloat16 and float16."""
    if isinstance(name_or_dtype, str):
        try:
            return _DTYPES[name_or_dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {name_or_dtype!r}; choose from {', '.join(_DTYPES)}") from None
    try:
        dtype = jnp.dtype(name_or_dtype)
    except TypeError:
        dtype = None
    if name_or_dtype is None or dtype not in {jnp.dtype(t) for t in _DTYPES.values()}:
        raise ValueError(f"dtype must be float32, bfloat16 or float16 (or a name: {', '.join(_DTYPES)}), "
                         f"got {name_or_dtype!r}")
    return dtype.type


_TEXT_FIELDS = {"text_encoder": "text", "text_encoder_2": "text_2"}  # params component -> ModelConfig field


def _token_rows(word, vectors, texts) -> dict:
    """{component: float32 [n, width]} of one `add_tokens` entry, checked against the text encoders `texts`
    ({component: TextEncoderConfig}): an array for a one-encoder model (kept as before), a mapping naming each of
    the model's encoders, with as many vectors for each."""
    if isinstance(vectors, Mapping):
        given = vectors
        if set(given) != set(texts):
            raise ValueError(f"token {word!r}: vectors for {', '.join(map(str, given)) or 'no encoder'}, expected "
                             f"them for {' and '.join(texts)} (this model's text encoders)")
    elif len(texts) > 1:
        raise ValueError(f"token {word!r}: one array of vectors for a model with {len(texts)} text encoders; give "
                         "{" + ", ".join(f'"{c}": [n, {t.hidden_size}]' for c, t in texts.items()) + "} (an SDXL "
                         "embedding's clip_l, clip_g)")
    else:
        given = {"text_encoder": vectors}
    rows = {}
    for component, t in texts.items():
        v = np.asarray(given[component], np.float32)
        v = v[None] if v.ndim == 1 else v
        if v.ndim != 2 or v.shape[0] < 1 or v.shape[1] != t.hidden_size:
            whose = "the text encoder's" if len(texts) == 1 else f"{component}'s"
            raise ValueError(f"token {word!r}: vectors of shape {np.shape(given[component])}, expected [n, "
                             f"{t.hidden_size}] ({whose} width)")
        rows[component] = v
    if len({len(v) for v in rows.values()}) > 1:
        counts = " and ".join(f"{len(v)} ({c})" for c, v in rows.items())
        raise ValueError(f"token {word!r}: {counts} vectors; a word needs as many for each text encoder")
    return rows


def _grown_token_embedding(encoder_params, rows):
    """A text encoder's params with `rows` ([n_i, width] arrays) appended to its token embedding, in order."""
    old = encoder_params["embeddings"]["token_embedding"]["embedding"]
    table = jnp.concatenate([old, jnp.asarray(np.concatenate(rows), old.dtype)])
    encoder = dict(encoder_params)
    encoder["embeddings"] = {**encoder["embeddings"], "token_embedding": {"embedding": table}}
    return encoder


@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusion:
    config: ModelConfig
    params: dict[str, Any]  # {"unet": ..., "vae": ..., "text_encoder": ...}
    dtype: Any = jnp.float32  # compute dtype (params stay as loaded, fp32 by default)
    attention_impl: str = "auto"
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)  # where the weights came from
    # textual-inversion words, ((word, token ids), ...): each whole word of a prompt stands for its ids (`add_tokens`)
    added_tokens: tuple = ()

    def __post_init__(self):  # "bf16", jnp.bfloat16, np.dtype(...) -> one scalar type; others refused here
        object.__setattr__(self, "dtype", as_dtype(self.dtype))

    @cached_property
    def modules(self):
        return modules(self.config, self.dtype, self.attention_impl)

    @cached_property
    def _tokenizer(self):
        from ldm_jax.tokenizer import ClipTokenizer

        return ClipTokenizer(max_length=self.config.text.max_length, pad_token_id=self.config.text.pad_token_id,
                             added_tokens=self.added_tokens)

    @cached_property
    def cache(self) -> dict:
        """Compiled programs and device-placed params of this instance (filled by the pipelines)."""
        return {}

    def replace(self, **changes) -> "StableDiffusion":
        """A copy with other fields, e.g. `sd.replace(dtype="bfloat16")` or new params. Give new weights this way:
        a model keeps its weights placed on the devices after its first request, so changing `sd.params` in place
        would not reach the compiled programs."""
        return dataclasses.replace(self, **changes)

    def add_tokens(self, tokens) -> "StableDiffusion":
        """A copy whose prompts may use new words (textual inversion, as diffusers' `load_textual_inversion`):
        tokens = [(word, vectors), ...], vectors [n, hidden] or [hidden] for a model with one text encoder and, for
        SDXL, {"text_encoder": [n, 768], "text_encoder_2": [n, 1280]} (an SDXL file's clip_l and clip_g), n the
        same for both. Each word gets n new token ids, from `config.text.vocab_size` up in order, whose rows of each
        encoder's token embedding are its vectors (each encoder's vocab_size grows by them). SDXL's two encoders read
        the same ids (`encode_text`), so they share the new ids, as diffusers' guide loads an SDXL file: one
        `load_textual_inversion` per (text encoder, tokenizer) pair, each tokenizer then numbering the word from its
        length, 49408. The whole word in a prompt, in any case, becomes those n ids (`ClipTokenizer`). A ValueError
        for a word that is empty, not one word, a CLIP token already or given twice, or vectors of another width,
        count or set of encoders."""
        from ldm_jax.tokenizer import ClipTokenizer, added_token_ids

        texts, tokens = self._text_configs(), list(tokens)
        if len({t.vocab_size for t in texts.values()}) > 1:
            sizes = ", ".join(f"{c} {t.vocab_size}" for c, t in texts.items())
            raise ValueError(f"the text encoders' vocabularies differ ({sizes}); new words need the same ids in both")
        rows = [_token_rows(word, vectors, texts) for word, vectors in tokens]
        text = self.config.text
        counts = [(word, len(r["text_encoder"])) for (word, _), r in zip(tokens, rows)]
        added = self.added_tokens + added_token_ids(counts, text.vocab_size)
        ClipTokenizer(text.max_length, text.pad_token_id, added)  # checks the words
        if not rows:
            return self
        params, config = dict(self.params), self.config
        for component, t in texts.items():
            params[component] = _grown_token_embedding(params[component], [r[component] for r in rows])
            table = params[component]["embeddings"]["token_embedding"]["embedding"]
            grown = dataclasses.replace(t, vocab_size=table.shape[0])
            config = dataclasses.replace(config, **{_TEXT_FIELDS[component]: grown})
        return self.replace(config=config, params=params, added_tokens=added)

    def _text_configs(self) -> dict:
        """{component: its TextEncoderConfig} of the model's text encoders ("text_encoder", SDXL's "text_encoder_2")."""
        return {c: getattr(self.config, f) for c, f in _TEXT_FIELDS.items() if getattr(self.config, f) is not None}

    def cast_params(self, params):
        """Kernels in the compute dtype: what every Dense/Conv would cast them to on each call, done once (e.g.
        before a sampling loop instead of in every step). Embeddings, norms and biases stay fp32."""
        if jnp.dtype(self.dtype) == jnp.float32:
            return params

        def cast(path, x):
            return x.astype(self.dtype) if path[-1].key == "kernel" else x

        return jax.tree_util.tree_map_with_path(cast, params)

    def tokenize(self, prompts) -> np.ndarray:
        """CLIP BPE ids int32 [B, max_length]: BOS, tokens, EOS, padded with pad_token_id."""
        return self._tokenizer(prompts)

    def encode_text(self, params, ids, pooled: bool = False):
        """ids int32 [B, L] -> context c [B, L, hidden] (fp32); L <= config.text.max_length (77: the position
        embeddings end there), ids < vocab_size (not checked: ids may be traced). SDXL: c is both encoders' states
        side by side [B, L, 768 + 1280] (the second reads the ids re-padded with its pad token), and `pooled=True`
        returns (c, pooled [B, 1280]), the second encoder's projected EOS state (for `vector_conditioning`; the
        SDXL refiner's only encoder's)."""
        if np.ndim(ids) != 2 or np.shape(ids)[1] > self.config.text.max_length:
            raise ValueError(f"ids must be [B, L] with L <= {self.config.text.max_length}, got shape {np.shape(ids)}")
        from ldm_jax.conditioning import encode_text

        return encode_text(self.modules, self.config, params, jnp.asarray(ids, jnp.int32), pooled)

    def vector_conditioning(self, pooled, size_hw, original_hw=None, crop_top_left=(0, 0), aesthetic_score=None):
        """SDXL's y [B, 2816] from the pooled text [B, 1280] and the image's pixel size (height, width): the
        original size (default: the same) and crop offsets it was "taken" at (`ldm_jax.conditioning`). The
        refiner's y [B, 2560] has an aesthetic score (default 6.0, the prompt's) instead of the target size."""
        from ldm_jax import conditioning as C

        b = pooled.shape[0]
        if self.config.is_sdxl_refiner:
            score = C.AESTHETIC_SCORE if aesthetic_score is None else aesthetic_score
            return C.vector_conditioning(pooled, C.refiner_numbers(b, size_hw, score, original_hw, crop_top_left))
        if aesthetic_score is not None:
            raise ValueError("aesthetic_score is for the SDXL refiner; SDXL base's y has the target size instead")
        return C.vector_conditioning(pooled, C.size_numbers(b, size_hw, original_hw, crop_top_left))

    def predict_noise(self, params, x, t, ctx, y=None):
        """The U-Net's output at (x_t, t, c): eps_theta, or v for a v-prediction model (`config.schedule.prediction`;
        `pipelines.program.eps_from_output` converts it). x [B, h, w, C], t int32 [B] (or a scalar), ctx [B, S, d],
        y [B, adm_in_channels] (SDXL only: `vector_conditioning`) -> [B, h, w, 4] fp32."""
        t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x.shape[0],))
        return self.modules["unet"].apply({"params": params["unet"]}, x, t, ctx, y)

    def encode_moments(self, params, images):
        """images [B, H, W, 3] in [-1, 1] -> posterior moments [B, H/f, W/f, 2 * 4] (unscaled)."""
        return self.modules["vae"].apply({"params": params["vae"]}, images, method="encode")

    def encode_image(self, params, images, key=None):
        """images NHWC in [-1, 1] -> scaled latents: the posterior mean, or a sample if `key` is given."""
        post = DiagonalGaussian(self.encode_moments(params, images))
        z = post.mode() if key is None else post.sample(key)
        return z * self.config.latent_scale

    def decode_latents(self, params, z):
        """Scaled latents [B, h, w, 4] -> images NHWC in [-1, 1] (not clipped; fp32)."""
        return self.modules["vae"].apply({"params": params["vae"]}, z / self.config.latent_scale, method="decode")

    @property
    def latent_factor(self) -> int:
        return self.config.vae.downsample_factor

    def num_params(self) -> dict[str, int]:
        return {c: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(p)) for c, p in self.params.items()}
