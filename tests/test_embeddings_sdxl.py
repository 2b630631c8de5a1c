"""SDXL textual-inversion embeddings ({"clip_l": [n, 768], "clip_g": [n, 1280]}): `convert.embeddings`,
`StableDiffusion.add_tokens` with vectors for both text encoders, the warm start's grown config, the CLI.

Ground truth: diffusers' "Stable Diffusion XL" textual-inversion guide loads an SDXL file with one
`TextualInversionLoaderMixin.load_textual_inversion` call per (text encoder, tokenizer) pair: clip_g into
text_encoder_2 / tokenizer_2, clip_l into text_encoder / tokenizer, the same token for both. Here that is run on
transformers' CLIPTokenizer (built offline from the shipped BPE vocabulary; tokenizer_2 pads with "!", id 0, as
SDXL's) and the tiny model's two towers as transformers models (diffusers' own single-file conversions of the
sgm-layout file): the ids of prompts using the words after `maybe_convert_prompt` for each tokenizer, both
resized token embeddings, and each tower's penultimate hidden states (and the pooled output) on those ids, which is
what diffusers' SDXL `encode_prompt` reads. The tiny preset's text widths are 64 (clip_l) and 32 (clip_g).
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import ldm_jax
from convert import torch_reference
from convert.embeddings import check_embeddings, read_embedding, with_embedding_rows
from convert.errors import CheckpointError
from convert.mapping import params_to_state_dict
from convert.safetensors_io import write_safetensors
from ldm_jax import configs
from ldm_jax.conditioning import repad
from ldm_jax.loading import CONFIG_METADATA_KEY
from ldm_jax.models.build import random_params
from ldm_jax.tokenizer import ClipTokenizer
from tests.cli_run import cli
from tests.parity import rel_err, write_clip_vocab

XL = configs.tiny_xl()
TOL = 1e-5
RNG = np.random.default_rng(11)
VECTORS = {"xlstyle": {"clip_l": RNG.standard_normal((2, 64)), "clip_g": RNG.standard_normal((2, 32))},
           "zzglow": {"clip_l": RNG.standard_normal((1, 64)), "clip_g": RNG.standard_normal((1, 32))}}
VECTORS = {w: {k: v.astype(np.float32) for k, v in d.items()} for w, d in VECTORS.items()}
PROMPTS = ["xlstyle", "a cat in the style of xlstyle, by zzglow", "ZZGLOW and (xlstyle:1.2), zzglow.",
           "a cat on a mat", "", " ".join(["word"] * 74) + " xlstyle"]  # its 2 ids at 75..76: the second is cut


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny SDXL file (sgm layout, config in its header) and two SDXL embeddings: xlstyle.safetensors (2
    vectors, as A1111 / civitai ship them) and zzglow.pt (1 vector, a torch pickle of the same dict)."""
    d = tmp_path_factory.mktemp("sdxl_embeddings")
    state = params_to_state_dict(random_params(XL, seed=1), text_layout="sgm")
    write_safetensors(d / "tiny_xl.safetensors", state, {CONFIG_METADATA_KEY: XL.to_json()})
    write_safetensors(d / "xlstyle.safetensors", VECTORS["xlstyle"])
    torch.save({k: torch.from_numpy(v) for k, v in VECTORS["zzglow"].items()}, d / "zzglow.pt")
    return {"dir": d, "state": state, "model": str(d / "tiny_xl.safetensors"), "st": str(d / "xlstyle.safetensors"),
            "pt": str(d / "zzglow.pt")}


@pytest.fixture(scope="module")
def base(files):
    return ldm_jax.load(files["model"])


@pytest.fixture(scope="module")
def model(files):
    return ldm_jax.load(files["model"], embeddings=[files["st"], files["pt"]])


@pytest.fixture(scope="module")
def encode(model):
    """(params, ids) -> (context, pooled) of the model with the words, compiled once for every call here (eagerly,
    its first call costs ~4 s on 2 cores); other params of the same shapes reuse it."""
    return jax.jit(lambda params, ids: model.encode_text(params, ids, pooled=True))


def _tables(sd):
    return [np.asarray(sd.params[c]["embeddings"]["token_embedding"]["embedding"])
            for c in ("text_encoder", "text_encoder_2")]


def _diffusers_reference(files, tmp_path):
    """((tokenizer, encoder) for clip_l, (tokenizer_2, encoder_2) for clip_g, the mixin) after diffusers' guide."""
    import transformers
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

    write_clip_vocab(tmp_path)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    tokenizer_2 = transformers.CLIPTokenizer.from_pretrained(str(tmp_path), pad_token="!")  # SDXL's tokenizer_2
    refs = torch_reference.build(XL, files["state"], components=("text_encoder", "text_encoder_2"))
    encoder, encoder_2 = (refs[c].inner() for c in ("text_encoder", "text_encoder_2"))

    class Pipeline(TextualInversionLoaderMixin):
        hf_device_map, components = None, {}

    pipe, words = Pipeline(), list(VECTORS)
    for key, tok, enc in (("clip_g", tokenizer_2, encoder_2), ("clip_l", tokenizer, encoder)):  # the guide's order
        pipe.load_textual_inversion([torch.from_numpy(VECTORS[w][key]) for w in words], token=words, tokenizer=tok,
                                    text_encoder=enc)
    return (tokenizer, encoder), (tokenizer_2, encoder_2), pipe


def test_ids_tables_and_encodings_match_diffusers_load_textual_inversion_per_encoder(files, model, encode, tmp_path):
    (tokenizer, encoder), (tokenizer_2, encoder_2), pipe = _diffusers_reference(files, tmp_path)
    ids = model.tokenize(PROMPTS)
    want = [tok(pipe.maybe_convert_prompt(PROMPTS, tok), padding="max_length", max_length=77, truncation=True,
                return_tensors="np")["input_ids"] for tok in (tokenizer, tokenizer_2)]
    np.testing.assert_array_equal(ids, want[0])
    np.testing.assert_array_equal(repad(ids, XL.text.eos_token_id, XL.text_2.pad_token_id), want[1])
    # the same new ids in both: xlstyle 49408-9, zzglow 49410, from each tokenizer's length
    assert ids[0, :4].tolist() == [49406, 49408, 49409, 49407] and 49410 in ids[1] and 49410 in ids[2]
    assert ids[5, 75:].tolist() == [49408, 49407] and (ids[3] < 49408).all()
    assert model.config.text.vocab_size == model.config.text_2.vocab_size == 49408 + 3
    for ours, theirs in zip(_tables(model), (encoder, encoder_2)):
        np.testing.assert_array_equal(ours, theirs.get_input_embeddings().weight.detach().numpy())
    with torch.no_grad():
        out = [enc(input_ids=torch.from_numpy(w.astype(np.int64)), output_hidden_states=True)
               for enc, w in zip((encoder, encoder_2), want)]
    ctx, pooled = encode(model.params, ids)
    d = XL.text.hidden_size
    errs = [rel_err(ctx[..., :d], out[0].hidden_states[-2].numpy()),  # diffusers' SDXL encode_prompt: [-2], no LN
            rel_err(ctx[..., d:], out[1].hidden_states[-2].numpy()), rel_err(pooled, out[1].text_embeds.numpy())]
    print("SDXL embeddings vs diffusers: text_encoder {:.1e}, text_encoder_2 {:.1e}, pooled {:.1e}".format(*errs))
    assert max(errs) <= TOL, errs


def test_encoding_equals_the_vectors_put_in_by_hand_and_the_warm_start_config(files, base, model, encode):
    """The model with the words against the model without them, given the grown tables and the ids by hand."""
    table_l, table_g = _tables(base)
    by_hand = {"text_encoder": np.concatenate([table_l] + [VECTORS[w]["clip_l"] for w in VECTORS]),
               "text_encoder_2": np.concatenate([table_g] + [VECTORS[w]["clip_g"] for w in VECTORS])}
    params = dict(base.params)
    for c, table in by_hand.items():
        params[c] = {**params[c], "embeddings": {**params[c]["embeddings"], "token_embedding": {"embedding": table}}}
    config = dataclasses.replace(XL, text=dataclasses.replace(XL.text, vocab_size=49411),
                                 text_2=dataclasses.replace(XL.text_2, vocab_size=49411))
    plain = ClipTokenizer()
    words = [49406, *plain.encode("a cat in the style of"), 49408, 49409, *plain.encode(", by"), 49410, 49407]
    hand_ids = np.array([words + [49407] * (77 - len(words))], np.int32)
    np.testing.assert_array_equal(model.tokenize(PROMPTS[1]), hand_ids)
    got, want = encode(model.params, hand_ids), encode(params, hand_ids)  # the same function, other tables
    assert max(rel_err(g, w) for g, w in zip(got, want)) <= 1e-6
    d = XL.text.hidden_size  # each encoder reads its own rows: both halves differ from a CLIP word in their place
    other, _ = encode(model.params, np.where(hand_ids >= 49408, 320, hand_ids))
    assert rel_err(got[0][..., :d], other[..., :d]) > 1e-2 and rel_err(got[0][..., d:], other[..., d:]) > 1e-2
    assert model.config == with_embedding_rows(XL, check_embeddings([files["st"], files["pt"]], XL)) == config
    # add_tokens directly, SDXL's form: the same model
    direct = base.add_tokens([(w, {"text_encoder": v["clip_l"], "text_encoder_2": v["clip_g"]})
                              for w, v in VECTORS.items()])
    assert direct.config == config and direct.added_tokens == model.added_tokens
    for a, b in zip(_tables(direct), by_hand.values()):
        np.testing.assert_array_equal(a, b)
    assert [(e["name"], e["token"], e["vectors"]) for e in model.metadata["embeddings"]] == [
        ("xlstyle.safetensors", "xlstyle", 2), ("zzglow.pt", "zzglow", 1)]


def test_cli_embedding_file_token_runs_and_is_named(files, tmp_path):
    out = tmp_path / "out"
    rc, stdout, err = cli("txt2img", "--checkpoint", files["model"], "--prompt", "a red cat by mytok", "--out", out,
                          "--steps", 2, "--height", 16, "--width", 16, "--seed", 3, "--embedding",
                          files["st"] + ":mytok")
    assert rc == 0, err
    # the program compiled for both grown vocabularies while the weights loaded; sampling compiled nothing more
    ready = re.search(r"program ready in ([0-9.]+)s", stdout)
    assert ready and f"(compile {ready.group(1)}s" in stdout, stdout
    (name,) = os.listdir(out)
    with Image.open(out / name) as im:
        assert im.text["embeddings"] == "xlstyle.safetensors:mytok" and im.text["model"] == "tiny-xl"


def _st(tmp_path, name, **tensors):
    write_safetensors(tmp_path / name, {k: np.zeros(v, np.float32) for k, v in tensors.items()})
    return str(tmp_path / name)


REFUSALS = {  # case: (tensors of the file, model config, needle)
    "SD 1.x on SDXL": (dict(emb_params=(2, 768)), configs.sdxl(),
                       "an SD 1.x embedding (768 wide) for an SDXL model (text widths 768 and 1280), whose two text "
                       "encoders each need vectors; use an SDXL embedding (clip_l, clip_g)"),
    "SD 2.x on SDXL": (dict(emb_params=(2, 1024)), configs.sdxl(), "an SD 2.x embedding (1024 wide) for an SDXL model"),
    "SDXL on SD 1.x": (dict(clip_l=(2, 768), clip_g=(2, 1280)), configs.sd1(),
                       "is an SDXL embedding (clip_l, clip_g: vectors for SDXL's two text encoders) for an SD 1.x "
                       "model (768); use an embedding trained for this model"),
    "SDXL on SD 2.x": (dict(clip_l=(2, 768), clip_g=(2, 1280)), configs.sd2(), "is an SDXL embedding (clip_l, "
                       "clip_g: vectors for SDXL's two text encoders) for an SD 2.x model (1024)"),
    "real SDXL on tiny-xl": (dict(clip_l=(2, 768), clip_g=(2, 1280)), XL, "an SDXL embedding of widths 768 (clip_l) "
                             "and 1280 (clip_g) for this tiny-xl model (text widths 64 and 32)"),
    "clip_l only": (dict(clip_l=(2, 64)), XL, "is an SDXL embedding without clip_g (it has clip_l only)"),
    "counts differ": (dict(clip_l=(2, 64), clip_g=(3, 32)), XL, "clip_l has 2 vectors and clip_g 3"),
    "bigG alone": (dict(emb_params=(2, 1280)), None, "an SDXL embedding (1280 wide) (OpenCLIP bigG) with vectors for "
                   "one text encoder only (emb_params)"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_other_family_and_bad_sdxl_files_are_refused_in_one_line(tmp_path, case):
    tensors, config, needle = REFUSALS[case]
    with pytest.raises(CheckpointError) as e:
        check_embeddings([_st(tmp_path, "zzemb.safetensors", **tensors)], config)
    assert str(e.value).startswith("embedding file ") and "\n" not in str(e.value), e.value
    assert f"zzemb.safetensors: {needle}" in str(e.value), e.value


def test_load_refuses_an_sd1_embedding_for_sdxl_before_reading_the_checkpoint(files, tmp_path, monkeypatch):
    monkeypatch.setattr("ldm_jax.loading._load_file", lambda *a, **k: pytest.fail("loaded the checkpoint"))
    with pytest.raises(CheckpointError, match=r"a 64-wide embedding for this tiny-xl model \(text widths 64 and 32\), "
                                              r"whose two text encoders each need vectors"):
        ldm_jax.load(files["model"], embeddings=[_st(tmp_path, "sd1.safetensors", emb_params=(1, 64))])


def test_reading_and_add_tokens_forms(files, base):
    e = read_embedding(files["pt"])
    assert (e.format, e.token, e.is_sdxl) == ("SDXL (clip_l, clip_g)", "zzglow", True)
    np.testing.assert_array_equal(e.vectors_2, VECTORS["zzglow"]["clip_g"])
    v = VECTORS["xlstyle"]
    for tokens, needle in (([("zzw", v["clip_l"])], "one array of vectors for a model with 2 text encoders"),
                           ([("zzw", {"text_encoder": v["clip_l"]})], "expected them for text_encoder and "
                                                                      "text_encoder_2"),
                           ([("zzw", {"text_encoder": v["clip_l"], "text_encoder_2": v["clip_g"][:1]})],
                            "2 (text_encoder) and 1 (text_encoder_2) vectors"),
                           ([("zzw", {"text_encoder": v["clip_l"], "text_encoder_2": v["clip_l"]})],
                            "expected [n, 32] (text_encoder_2's width)")):
        with pytest.raises(ValueError, match=re.escape(needle)):
            base.add_tokens(tokens)
    from convert.file_kinds import describe

    kind = describe({"clip_l": np.zeros((2, 768)), "clip_g": np.zeros((2, 1280))})
    assert kind.startswith("this file is an SDXL textual-inversion embedding (clip_l, clip_g), not a checkpoint; "
                           "pass it with --embedding FILE[:TOKEN]") and "Stable Diffusion XL checkpoint" in kind
