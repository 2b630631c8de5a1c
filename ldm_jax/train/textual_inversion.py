"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word: Personalizing Text-to-Image Generation using
Textual Inversion"): `ldm-jax train --textual-inversion WORD --init-word WORD0 [--num-vectors N]`.

A new word gets N new token ids (`StableDiffusion.add_tokens`, the ids diffusers' `load_textual_inversion` gives it)
whose rows of the text encoder's token embedding v_1..v_N are the only trained parameters; the U-Net, the autoencoder
and the rest of the text encoder stay frozen, and the loss is the usual one (Rombach et al. 2022 eq. 2) with captions
that use the word, so v* = argmin_v E || eps - eps_theta(z_t, t, tau(y; v)) ||^2 (Gal et al. eq. 2), as diffusers'
`examples/textual_inversion/textual_inversion.py`. Each v_i starts as the embedding of `--init-word` (one CLIP
token, as diffusers' initializer token). SDXL: the word's rows of both encoders train (each encoder reads the same
new ids, `conditioning.encode_text`).

State: {component: float32 [N, width]} (the rows, per text encoder); `frozen` holds the model whose token tables
already have N rows for the word (the initial vectors), and the loss puts the state's rows in their place
(`with_rows`). The result is RUN_DIR/embedding.safetensors in A1111's format, {"emb_params": [N, width]} (SDXL:
{"clip_l", "clip_g"}), which `--embedding FILE:WORD`, A1111, ComfyUI and diffusers read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.errors import UserError
from ldm_jax.train.lora import text_components

FILE = "embedding.safetensors"


def _table(text_params) -> jax.Array:
    return text_params["embeddings"]["token_embedding"]["embedding"]


def add_word(sd, word: str, init_word: str, n: int):
    """The model with `word` at `n` new token ids, each row of each text encoder the embedding of `init_word`."""
    ids = sd.tokenize([init_word])[0]
    inner = [int(i) for i in ids[1:] if i not in (sd.config.text.eos_token_id, sd.config.text.pad_token_id)]
    if len(inner) != 1:
        raise UserError(f"--init-word {init_word!r} is {len(inner)} CLIP tokens; give a word that is one token "
                        "(e.g. 'dog', 'painting', 'toy')")
    vectors = {c: np.repeat(np.asarray(_table(sd.params[c])[inner[0]], np.float32)[None], n, axis=0)
               for c in text_components(sd.config)}
    try:
        return sd.add_tokens([(word, vectors if len(vectors) > 1 else vectors["text_encoder"])])
    except ValueError as e:
        raise UserError(f"--textual-inversion {word!r}: {e}") from None


def check_captions(sd, captions, word: str, n: int) -> None:
    """UserError when no caption uses the word (its new ids would get no gradient)."""
    new = sd.config.text.vocab_size - n  # the first of the word's ids
    if not any((sd.tokenize(list(captions[i:i + 256])) >= new).any() for i in range(0, len(captions), 256)):
        raise UserError(f"no caption uses the word {word!r} (whole word, any case); write it into the captions or "
                        f"give --instance-prompt 'a photo of {word}'")


def initial_rows(params: dict, config, n: int) -> dict:
    """{component: float32 [n, width]}: the word's rows of a model from `add_word`."""
    return {c: jnp.asarray(_table(params[c])[-n:], jnp.float32) for c in text_components(config)}


def abstract_rows(config, n: int) -> dict:
    texts = {"text_encoder": config.text, "text_encoder_2": config.text_2}
    return {c: jax.ShapeDtypeStruct((n, texts[c].hidden_size), jnp.float32) for c in text_components(config)}


def with_rows(text_params, rows: jax.Array):
    """A text encoder's params whose last len(rows) token-embedding rows are `rows` (traceable, differentiable in
    `rows`)."""
    table = _table(text_params)
    grown = jnp.concatenate([table[:table.shape[0] - rows.shape[0]], rows.astype(table.dtype)])
    return {**text_params, "embeddings": {**text_params["embeddings"], "token_embedding": {"embedding": grown}}}


def write(path: str, rows: dict, word: str, meta: dict) -> None:
    """The A1111 embedding file of the trained rows (atomically: `write_safetensors`)."""
    from convert.embeddings import SDXL_KEYS
    from convert.errors import CheckpointError
    from convert.safetensors_io import write_safetensors

    rows = {c: np.asarray(jax.device_get(v), np.float32) for c, v in rows.items()}
    tensors = ({"emb_params": rows["text_encoder"]} if len(rows) == 1  # SDXL_KEYS: text_encoder's, text_encoder_2's
               else dict(zip(SDXL_KEYS, (rows["text_encoder"], rows["text_encoder_2"]))))
    info = {"ldm_jax_word": word, "ldm_jax_source": f"ldm-jax train {meta.get('run_dir')} step {meta.get('step')}"}
    try:
        write_safetensors(path, {k: np.ascontiguousarray(v) for k, v in tensors.items()}, info)
    except CheckpointError as e:
        raise UserError(str(e)) from None
