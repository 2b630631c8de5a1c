"""Textual-inversion embeddings (Gal et al. 2022, "An Image is Worth One Word"): read them, check them against a
model, and give the model their words (`StableDiffusion.add_tokens`).

An embedding is n learned vectors of the text encoder's width (768 for SD 1.x's CLIP ViT-L/14, 1024 for SD 2.x's
OpenCLIP ViT-H/14) that a prompt word stands for. The files users have (A1111 `modules/textual_inversion/
textual_inversion.py` and diffusers `loaders/textual_inversion.py` read the same ones):

* A1111 / rinongal `.pt` (a torch zip pickle): {"string_to_param": {"*": tensor [n, d]}, "string_to_token":
  {"*": 265}, "name": ..., "step": ..., "sd_checkpoint": ..., ...}; in rinongal-era files `string_to_param` is a
  `torch.nn.ParameterDict` (read through `convert.ckpt_reader`'s inert stub: its `_parameters`). One term only.
* A1111 / kohya-ss `.safetensors` (or `.pt`): {"emb_params": [n, d]}.
* diffusers `learned_embeds.safetensors` / `.bin`: {"<token>": [d] or [n, d]}, the one tensor named after its
  token (sd-concepts-library).
* SDXL files (A1111 `create_embedding_from_data`, diffusers' "Stable Diffusion XL" textual-inversion guide):
  {"clip_l": [n, 768], "clip_g": [n, 1280]}, n vectors for each of SDXL's text encoders, CLIP ViT-L/14
  (`text_encoder`) and OpenCLIP ViT-bigG/14 (`text_encoder_2`). diffusers' guide loads one with a
  `load_textual_inversion` call per (text encoder, tokenizer) pair, clip_l into text_encoder / tokenizer and clip_g
  into text_encoder_2 / tokenizer_2, the same token for both: each tokenizer (both 49,408 long) numbers the word
  from its length, so the word has the same ids in both encoders, as here (one tokenizer, whose ids both encoders
  read: `StableDiffusion.encode_text`). An SDXL embedding takes an SDXL model, and an SD 1.x / 2.x one a model
  with one text encoder; either the other way round is refused.

The prompt word (TOKEN) is, as in A1111, the file's base name without its extension unless given
(`--embedding FILE:TOKEN`, `embeddings=[(path, token)]`); diffusers' own default (the key or "name" inside) is
not used. It is matched as a whole word in any case (CLIP lower-cases prompts) and must not already be a CLIP
token. An n-vector embedding takes n new token ids (as diffusers' TOKEN, TOKEN_1, ..., TOKEN_{n-1}); the prompt's
word becomes all n. No torch: files are read by `convert.ckpt_reader` / `convert.safetensors_io` (memory-mapped,
no code from the file runs), and every problem is one line naming the file, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import numpy as np

from convert.errors import CheckpointError
from convert.readers import labelled, sha256_file

FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL"}  # text widths: CLIP-L, OpenCLIP-H, OpenCLIP-bigG
SDXL_KEYS = ("clip_l", "clip_g")  # an SDXL file's tensors: text_encoder's (CLIP ViT-L), text_encoder_2's (bigG)
SDXL_FORMAT = "SDXL (clip_l, clip_g)"
RETRY = "choose another with --embedding FILE:TOKEN (ldm_jax.load(..., embeddings=[(FILE, TOKEN)]))"


def _error(path: str, message: str) -> CheckpointError:
    return CheckpointError(labelled("embedding file", path, message))


@dataclasses.dataclass(frozen=True, eq=False)
class Embedding:
    """One embedding file, read: its path, the prompt word, vectors float32 [n, width], format and sha256; an SDXL
    file's vectors are its clip_l (text_encoder's) and vectors_2 its clip_g (text_encoder_2's), [n, width_2]."""

    path: str
    token: str
    vectors: np.ndarray
    format: str
    sha256: str
    vectors_2: np.ndarray | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.vectors_2 is not None

    def for_encoders(self, config=None):
        """What `StableDiffusion.add_tokens` takes for the word: the vectors, or SDXL's {"text_encoder": clip_l,
        "text_encoder_2": clip_g}; for the SDXL refiner (`config`), whose one encoder is SDXL's second, clip_g."""
        if self.vectors_2 is None:
            return self.vectors
        if config is not None and config.is_sdxl_refiner:
            return self.vectors_2
        return {"text_encoder": self.vectors, "text_encoder_2": self.vectors_2}

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def record(self) -> dict:
        """What `metadata["embeddings"]` keeps of it."""
        return {"name": self.name, "token": self.token, "vectors": int(self.vectors.shape[0]), "sha256": self.sha256}


def default_token(path: str | os.PathLike) -> str:
    """The prompt word of an embedding file given without one: its base name without the extension (A1111)."""
    return os.path.splitext(os.path.basename(os.fspath(path)))[0]


def parse_embedding_arg(text: str) -> tuple[str, str | None]:
    """--embedding FILE[:TOKEN] -> (FILE, TOKEN or None). A path that exists is taken whole (it may hold ':');
    a tail with a path separator is part of the path (c:\\x.pt)."""
    if os.path.exists(text):
        return text, None
    path, sep, token = text.rpartition(":")
    if not sep or not path or "/" in token or "\\" in token:
        return text, None
    if not token.strip():
        raise ValueError(f"{text!r}: the token after ':' is empty (FILE[:TOKEN])")
    return path, token


def embedding_arg(text: str) -> tuple[str, str | None]:
    """argparse `type=` of --embedding: parse_embedding_arg, its error as argparse's one line."""
    import argparse

    try:
        return parse_embedding_arg(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _container(path: str) -> Mapping:
    """The top-level dict of an embedding file (torch zip pickle or safetensors), every error one line."""
    from convert.ckpt_reader import read_ckpt
    from convert.safetensors_io import read_safetensors

    if not path:
        raise CheckpointError("the embedding file path is empty")
    if not os.path.exists(path):
        raise _error(path, "no such file")
    if os.path.isdir(path):
        raise _error(path, "is a directory, expected an embedding file (.pt, .safetensors or .bin)")
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise _error(path, f"cannot read: {e.strerror or e}") from None
    if not head:
        raise _error(path, "file is empty")
    torch_file = head.startswith(b"PK\x03\x04") or (head[8:9] != b"{" and head[:1] == b"\x80")
    if not torch_file and head[8:9] != b"{" and not path.lower().endswith(".safetensors"):
        raise _error(path, "not an embedding file (by its first bytes neither a safetensors file nor a torch zip "
                           "archive; embeddings stored in images are not supported)")
    try:
        return read_ckpt(path) if torch_file else read_safetensors(path)[0]
    except CheckpointError as e:
        raise _error(path, str(e)) from None


def _parameters(value):
    """The {name: tensor} of A1111's string_to_param: a dict, or the inert stub of a torch.nn.ParameterDict."""
    if isinstance(value, Mapping):
        return value
    state = getattr(value, "state", None)
    state = state[0] if isinstance(state, tuple) and state else state
    inner = state.get("_parameters") if isinstance(state, Mapping) else None
    return inner if isinstance(inner, Mapping) else None


def _tensor_and_format(path: str, data: Mapping) -> tuple[object, str]:
    keys = [str(k) for k in data]
    if "string_to_param" in data:
        params = _parameters(data["string_to_param"])
        if params is None:
            raise _error(path, f"string_to_param is a {type(data['string_to_param']).__name__}, expected a dict "
                               "of tensors")
        if len(params) != 1:
            raise _error(path, f"string_to_param holds {len(params)} terms ({', '.join(map(str, params))}); an "
                               "A1111 embedding has one")
        return next(iter(params.values())), "A1111 .pt (string_to_param)"
    if "emb_params" in data:
        return data["emb_params"], "A1111 .safetensors (emb_params)"
    if len(data) == 1 and isinstance(next(iter(data.values())), np.ndarray):
        return next(iter(data.values())), f"diffusers learned_embeds ({keys[0]})"
    from convert.file_kinds import describe

    tensors = all(isinstance(v, np.ndarray) for v in data.values())
    kind = describe(data) if tensors else None
    if kind is None and any(k.startswith("model.diffusion_model.") for k in keys):
        kind = "this file is a full Stable Diffusion checkpoint (pass it as the checkpoint)"
    what = kind.split(";")[0] if kind else f"keys {', '.join(keys[:3]) or 'none'}"
    raise _error(path, f"is not a textual-inversion embedding (A1111 string_to_param or emb_params, or one diffusers "
                       f"token tensor): {what}")


def _width(d: int) -> str:
    return f"an {FAMILIES[d]} embedding ({d} wide)" if d in FAMILIES else f"a {d}-wide embedding"


def _vectors(path: str, tensor, where: str, lone: bool = True) -> np.ndarray:
    """The [n, d] float32 vectors of `tensor` ([d] is one vector), checked; `lone`: the file's only tensor (not
    one of an SDXL file's two), where OpenCLIP bigG's width is refused (half of an SDXL embedding)."""
    if not isinstance(tensor, np.ndarray):
        raise _error(path, f"{where} is a {type(tensor).__name__}, expected a tensor")
    shape = tuple(tensor.shape)
    if tensor.ndim not in (1, 2) or 0 in shape or tensor.dtype.kind not in "fV":
        raise _error(path, f"{where}: {tensor.dtype} {shape}, expected float vectors [n, width] or [width]")
    vectors = np.array(tensor.reshape(-1, shape[-1]), dtype=np.float32)
    if not np.isfinite(vectors).all():
        raise _error(path, f"{where}: has non-finite values (NaN or inf)")
    if lone and vectors.shape[1] == 1280:
        raise _error(path, f"{_width(1280)} (OpenCLIP bigG) with vectors for one text encoder only ({where}); an SDXL "
                           "embedding has them for both: clip_l [n, 768] and clip_g [n, 1280]")
    return vectors


def _sdxl_vectors(path: str, data: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """(clip_l, clip_g) float32 [n, d] of an SDXL file (A1111 reads it when it has both keys), with as many vectors
    for each encoder; other keys are left alone, as A1111 does."""
    missing = [k for k in SDXL_KEYS if k not in data]
    if missing:
        (has,) = [k for k in SDXL_KEYS if k in data]
        raise _error(path, f"is an SDXL embedding without {missing[0]} (it has {has} only); an SDXL embedding has "
                           "vectors for both text encoders: clip_l [n, 768] (CLIP ViT-L) and clip_g [n, 1280] "
                           "(OpenCLIP bigG)")
    clip_l, clip_g = (_vectors(path, data[k], k, lone=False) for k in SDXL_KEYS)
    if len(clip_l) != len(clip_g):
        raise _error(path, f"clip_l has {len(clip_l)} vectors and clip_g {len(clip_g)}; an SDXL embedding has as "
                           "many for each text encoder")
    return clip_l, clip_g


def read_embedding(path: str | os.PathLike, token: str | None = None) -> Embedding:
    """The embedding in `path` for the prompt word `token` (default: the file's base name); a CheckpointError
    naming the file for a missing or unreadable file, another kind of file, bad vectors or a bad token."""
    return _checked_token(_read(path, token))


def _read(path: str | os.PathLike, token: str | None) -> Embedding:
    """`read_embedding` but for the token, not checked yet (`check_embeddings` first says when the file is for
    another kind of model: the more basic fault)."""
    path = os.fspath(path)
    data = _container(path)
    if any(k in data for k in SDXL_KEYS):
        kind, (vectors, vectors_2) = SDXL_FORMAT, _sdxl_vectors(path, data)
    else:
        tensor, kind = _tensor_and_format(path, data)
        vectors, vectors_2 = _vectors(path, tensor, kind.split(" (")[-1].rstrip(")")), None
    token = default_token(path) if token is None else token
    return Embedding(path, token, vectors, kind, sha256_file(path), vectors_2)


def _checked_token(item: Embedding) -> Embedding:
    """`item`, if its token can be an added word (`ldm_jax.tokenizer.added_word`); else a CheckpointError."""
    from ldm_jax.tokenizer import added_word

    try:
        added_word(item.token)
    except ValueError as e:
        raise _error(item.path, f"{e}; {RETRY}") from None
    return item


def _model(config) -> str:
    d = config.text.hidden_size
    if config.is_sdxl:
        widths = f"{d} and {config.text_2.hidden_size}"
        sdxl = (d, config.text_2.hidden_size) == (768, 1280)
        return f"an SDXL model (text widths {widths})" if sdxl else f"this {config.name} model (text widths {widths})"
    return f"an {FAMILIES[d]} model ({d})" if d in FAMILIES else f"this {config.name} model (text width {d})"


def _misfit(item: Embedding, config) -> str | None:
    """Why `item` cannot go into `config`'s model (None: it fits): the other family (an SDXL embedding for a model
    with one text encoder but the SDXL refiner, which reads its clip_g, or one encoder's embedding for SDXL), or a
    width that is not its encoder's."""
    d, t2 = item.vectors.shape[1], config.text_2
    if item.is_sdxl and config.is_sdxl_refiner:  # its encoder is SDXL's second: the file's clip_g
        d_g = item.vectors_2.shape[1]
        return None if d_g == config.text.hidden_size else (
            f"an SDXL embedding whose clip_g is {d_g} wide for {_model(config)}; use an embedding trained for "
            "this model")
    if item.is_sdxl and t2 is None:
        return (f"is an SDXL embedding (clip_l, clip_g: vectors for SDXL's two text encoders) for {_model(config)}; "
                "use an embedding trained for this model")
    if not item.is_sdxl and t2 is not None:
        return (f"{_width(d)} for {_model(config)}, whose two text encoders each need vectors; use an SDXL "
                "embedding (clip_l, clip_g)")
    if item.is_sdxl and (d, item.vectors_2.shape[1]) != (config.text.hidden_size, t2.hidden_size):
        return (f"an SDXL embedding of widths {d} (clip_l) and {item.vectors_2.shape[1]} (clip_g) for "
                f"{_model(config)}; use an embedding trained for this model")
    if d != config.text.hidden_size:
        return f"{_width(d)} for {_model(config)}; use an embedding trained for this model"
    return None


def check_embeddings(embeddings, config=None, taken=()) -> list[Embedding]:
    """Read and check embeddings given as paths, (path, token or None) pairs or `Embedding`s, before a model is
    loaded: each file (`read_embedding`), its family and widths against the model's text encoder(s) when `config` is
    known (before its token), and no word given twice, nor one of `taken` (words the model already has)."""
    from ldm_jax.tokenizer import added_word

    out, seen = [], {added_word(w): None for w in taken}
    for item in embeddings or ():
        if not isinstance(item, Embedding):
            path, token = (item, None) if isinstance(item, (str, os.PathLike)) else item
            item = _read(path, token)
        misfit = None if config is None else _misfit(item, config)
        if misfit:
            raise _error(item.path, misfit)
        word = added_word(_checked_token(item).token)
        if word in seen:
            other = seen[word]
            where = f"also the token of {other.path}" if other else "a word the model already has an embedding for"
            raise _error(item.path, f"token {item.token!r} is {where}; {RETRY}")
        seen[word] = item
        out.append(item)
    return out


def with_embedding_rows(config, embeddings):
    """`config` with each text encoder's vocabulary (SDXL: both) grown by every vector of `embeddings` (what
    `apply_embeddings` makes of it: the shapes a program can compile against while the weights load)."""
    n = sum(e.vectors.shape[0] for e in embeddings)
    if not n:
        return config
    grown = {f: dataclasses.replace(t, vocab_size=t.vocab_size + n)
             for f, t in (("text", config.text), ("text_2", config.text_2)) if t is not None}
    return dataclasses.replace(config, **grown)


def apply_embeddings(sd, embeddings):
    """A copy of the StableDiffusion `sd` whose prompts may use each embedding's word (`check_embeddings`, then
    `sd.add_tokens`); `metadata["embeddings"]`: [{"name", "token", "vectors", "sha256"}], after any earlier ones."""
    checked = check_embeddings(embeddings, sd.config, taken=[w for w, _ in sd.added_tokens])
    out = sd.add_tokens([(e.token, e.for_encoders(sd.config)) for e in checked])
    earlier = sd.metadata.get("embeddings")
    records = (list(earlier) if isinstance(earlier, list) else []) + [e.record() for e in checked]
    return out.replace(metadata={**out.metadata, "embeddings": records})


def describe_embeddings(metadata: Mapping) -> str | None:
    """PNG text, "file.pt:token, other.safetensors:other" (None without embeddings), of `metadata["embeddings"]`;
    entries that are not {"name", "token"} are left out."""
    entries = metadata.get("embeddings")
    if not isinstance(entries, list):
        return None
    out = [f"{e['name']}:{e['token']}" for e in entries if isinstance(e, Mapping) and "name" in e and "token" in e]
    return ", ".join(out) or None
