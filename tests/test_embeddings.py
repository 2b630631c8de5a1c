"""Textual-inversion embeddings (`ldm_jax.load(..., embeddings=)`, `--embedding FILE[:TOKEN]`): `convert.embeddings`,
`ClipTokenizer(added_tokens=)`, `StableDiffusion.add_tokens`.

Ground truth: diffusers' own `TextualInversionLoaderMixin.load_textual_inversion` (reading the same files) on
transformers' CLIPTokenizer (built offline from the shipped BPE vocabulary) and CLIPTextModel (the tiny model's
weights): the token ids of prompts using the words, after diffusers' multi-vector expansion
(`maybe_convert_prompt`), and the text encoder's output with the resized embedding matrix.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import ldm_jax
from convert import torch_reference
from convert.embeddings import check_embeddings, parse_embedding_arg, read_embedding
from convert.errors import CheckpointError
from convert.safetensors_io import write_safetensors
from ldm_jax import configs
from ldm_jax.loading import CONFIG_METADATA_KEY
from ldm_jax.tokenizer import ClipTokenizer
from tests.cli_run import cli
from tests.parity import rel_err, write_clip_vocab

TINY = configs.tiny()  # text width 64
TOL = 1e-5
RNG = np.random.default_rng(7)
VECTORS = {"mystyle": RNG.standard_normal((2, 64)).astype(np.float32),  # A1111 .pt, 2 vectors
           "<cat-toy>": RNG.standard_normal(64).astype(np.float32),  # diffusers learned_embeds.bin, one [d] vector
           "kohya_look": RNG.standard_normal((3, 64)).astype(np.float32)}  # emb_params .safetensors, 3 vectors
PROMPTS = [
    "mystyle",
    "a photo of a cat in the style of mystyle",
    "mystyle, a painting of <cat-toy> by kohya_look.",
    "<cat-toy> and <cat-toy>! (mystyle:1.2)",
    "kohya_look kohya_look, mystyle's hat",
    "a cat sitting on a mat",
    " ".join(["word"] * 73) + " kohya_look",  # its 3 ids at positions 74..76: the last is cut (75 text tokens)
]


def _a1111_pt(path, vectors, parameter_dict=False):
    params = (torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.from_numpy(vectors))}) if parameter_dict else
              {"*": torch.from_numpy(vectors).requires_grad_()})
    torch.save({"string_to_token": {"*": 265}, "string_to_param": params, "name": "trained-name", "step": 500,
                "sd_checkpoint": "7460a6fa", "sd_checkpoint_name": "sd-v1-4"}, path)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("embeddings")
    state = torch_reference.random_state_dict(TINY, seed=2)
    model = d / "tiny.safetensors"
    write_safetensors(model, state, {CONFIG_METADATA_KEY: TINY.to_json()})
    torch.save({"<cat-toy>": torch.from_numpy(VECTORS["<cat-toy>"])}, d / "learned_embeds.bin")
    write_safetensors(d / "kohya_look.safetensors", {"emb_params": VECTORS["kohya_look"]})
    return {"dir": d, "model": str(model), "state": state, "pt": _a1111_pt(d / "mystyle.pt", VECTORS["mystyle"]),
            "bin": str(d / "learned_embeds.bin"), "st": str(d / "kohya_look.safetensors")}


def _embeddings(files):
    return [files["pt"], (files["bin"], "<cat-toy>"), files["st"]]


@pytest.fixture(scope="module")
def model(files):
    return ldm_jax.load(files["model"], embeddings=_embeddings(files))


def _diffusers_reference(files, tmp_path):
    """(transformers CLIPTokenizer, CLIPTextModel) after diffusers' load_textual_inversion of the three files."""
    import transformers
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

    write_clip_vocab(tmp_path)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    encoder = torch_reference.build(TINY, files["state"], components=("text_encoder",))["text_encoder"]

    class Pipeline(TextualInversionLoaderMixin):
        hf_device_map, components = None, {}

    pipe = Pipeline()
    pipe.load_textual_inversion([files["pt"], files["bin"], files["st"]], token=["mystyle", "<cat-toy>", "kohya_look"],
                                tokenizer=tokenizer, text_encoder=encoder)
    return pipe, tokenizer, encoder


def test_token_ids_and_text_encoder_match_diffusers_load_textual_inversion(files, model, tmp_path):
    pipe, tokenizer, encoder = _diffusers_reference(files, tmp_path)
    want = tokenizer(pipe.maybe_convert_prompt(PROMPTS, tokenizer), padding="max_length", max_length=77,
                     truncation=True, return_tensors="np")["input_ids"]
    ids = model.tokenize(PROMPTS)
    np.testing.assert_array_equal(ids, want)
    # the words became the new ids in order (mystyle 49408-9, <cat-toy> 49410, kohya_look 49411-3); the last is cut
    assert ids[0, :4].tolist() == [49406, 49408, 49409, 49407]
    assert ids[4, 1:7].tolist() == [49411, 49412, 49413, 49411, 49412, 49413]
    assert ids[6, 74:].tolist() == [49411, 49412, 49407] and (ids[5] < 49408).all()
    assert model.config.text.vocab_size == 49408 + 6 == encoder.get_input_embeddings().weight.shape[0]
    with torch.no_grad():
        ref = encoder(input_ids=torch.from_numpy(want.astype(np.int64))).last_hidden_state.numpy()
    err = rel_err(model.encode_text(model.params, ids), ref)
    assert err <= TOL, err


def test_words_match_whole_words_in_any_case_and_leave_the_rest_alone(model):
    plain = ClipTokenizer()
    np.testing.assert_array_equal(model.tokenize("A MyStyle, KOHYA_LOOK"), model.tokenize("a mystyle, kohya_look"))
    for text in ("mystyles", "xmystyle", "mystyle2", "kohya_looks", "a <cat-toy>s", "mystyle_"):
        np.testing.assert_array_equal(model.tokenize(text), plain(text))  # not the word: tokenised as before
    table = np.asarray(model.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"])
    np.testing.assert_array_equal(table[49408:], np.concatenate([VECTORS["mystyle"], VECTORS["<cat-toy>"][None],
                                                                 VECTORS["kohya_look"]]))
    assert [(e["name"], e["token"], e["vectors"]) for e in model.metadata["embeddings"]] == [
        ("mystyle.pt", "mystyle", 2), ("learned_embeds.bin", "<cat-toy>", 1),
        ("kohya_look.safetensors", "kohya_look", 3)]
    assert all(len(e["sha256"]) == 64 for e in model.metadata["embeddings"])


def test_each_file_format_reads(files, tmp_path):
    rinongal = _a1111_pt(tmp_path / "rinongal.pt", VECTORS["mystyle"], parameter_dict=True)
    torch.save({"emb_params": torch.from_numpy(VECTORS["kohya_look"])}, tmp_path / "kohya.pt")
    write_safetensors(tmp_path / "fp16.safetensors", {"<x>": VECTORS["kohya_look"].astype(np.float16)})
    cases = [(files["pt"], "A1111 .pt (string_to_param)", "mystyle", VECTORS["mystyle"]),
             (rinongal, "A1111 .pt (string_to_param)", "rinongal", VECTORS["mystyle"]),
             (files["bin"], "diffusers learned_embeds (<cat-toy>)", "learned_embeds", VECTORS["<cat-toy>"][None]),
             (files["st"], "A1111 .safetensors (emb_params)", "kohya_look", VECTORS["kohya_look"]),
             (str(tmp_path / "kohya.pt"), "A1111 .safetensors (emb_params)", "kohya", VECTORS["kohya_look"]),
             (str(tmp_path / "fp16.safetensors"), "diffusers learned_embeds (<x>)", "fp16",
              VECTORS["kohya_look"].astype(np.float16).astype(np.float32))]
    for path, kind, token, vectors in cases:
        e = read_embedding(path)
        assert (e.format, e.token, e.vectors.dtype) == (kind, token, np.float32), path
        np.testing.assert_array_equal(e.vectors, vectors)


def _refusal(tmp_path, case):
    """(embeddings argument, config, needle) of each refusal."""
    def st(name, tensors):
        write_safetensors(tmp_path / name, {k: np.asarray(v, np.float32) for k, v in tensors.items()})
        return str(tmp_path / name)

    if case == "text file":
        (tmp_path / "notes.pt").write_text("not an embedding")
    if case == "directory":
        (tmp_path / "dir.pt").mkdir()
    two_terms = tmp_path / "two.pt"
    if case == "two terms":
        torch.save({"string_to_param": {"*": torch.zeros(1, 64), "+": torch.zeros(1, 64)}}, two_terms)
    return {
        "missing": ([str(tmp_path / "gone.pt")], TINY, "gone.pt: no such file"),
        "directory": ([str(tmp_path / "dir.pt")], TINY, "dir.pt: is a directory"),
        "text file": ([str(tmp_path / "notes.pt")], TINY, "notes.pt: not an embedding file"),
        "SD 2.x for SD 1.x": ([st("sd2.safetensors", {"emb_params": np.zeros((2, 1024))})], configs.sd1(),
                              "sd2.safetensors: an SD 2.x embedding (1024 wide) for an SD 1.x model (768)"),
        "SD 1.x for SD 2.x": ([st("sd1.safetensors", {"emb_params": np.zeros((2, 768))})], configs.sd2(),
                              "sd1.safetensors: an SD 1.x embedding (768 wide) for an SD 2.x model (1024)"),
        "SDXL": ([st("xl.safetensors", {"clip_l": np.zeros((2, 768)), "clip_g": np.zeros((2, 1280))})], TINY,
                 "xl.safetensors: is an SDXL embedding (clip_l, clip_g"),
        "bigG width": ([st("g.safetensors", {"emb_params": np.zeros((2, 1280))})], None,
                       "g.safetensors: an SDXL embedding (1280 wide)"),
        "non-finite": ([st("nan.safetensors", {"emb_params": np.full((1, 64), np.nan)})], TINY, "non-finite"),
        "two terms": ([str(two_terms)], TINY, "string_to_param holds 2 terms"),
        "a LoRA": ([st("lora.safetensors", {"lora_unet_x.lora_down.weight": np.zeros((2, 4)),
                                            "lora_unet_x.lora_up.weight": np.zeros((4, 2))})], TINY,
                   "is not a textual-inversion embedding (A1111 string_to_param or emb_params, or one diffusers token "
                   "tensor): this file is a LoRA"),
        "token in vocabulary": ([(st("a.safetensors", {"emb_params": np.zeros((1, 64))}), "Cat")], TINY,
                                "token 'Cat' is already a token of CLIP's vocabulary"),
        "token with a space": ([(st("b.safetensors", {"emb_params": np.zeros((1, 64))}), "my style")], TINY,
                               "token 'my style' is not one word"),
        "token twice": ([st("zzemb.safetensors", {"emb_params": np.zeros((1, 64))}),
                         (st("d.safetensors", {"emb_params": np.zeros((1, 64))}), "ZZemb")], TINY,
                        "d.safetensors: token 'ZZemb' is also the token of "),
    }[case]


REFUSALS = ["missing", "directory", "text file", "SD 2.x for SD 1.x", "SD 1.x for SD 2.x", "SDXL", "bigG width",
            "non-finite", "two terms", "a LoRA", "token in vocabulary", "token with a space", "token twice"]


@pytest.mark.parametrize("case", REFUSALS)
def test_bad_embeddings_are_refused_in_one_line(tmp_path, case):
    embeddings, config, needle = _refusal(tmp_path, case)
    with pytest.raises(CheckpointError) as e:
        check_embeddings(embeddings, config)
    assert needle in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("embedding file "), e.value


def test_load_refuses_before_reading_the_checkpoint_and_a_word_the_model_has(files, model, tmp_path, monkeypatch):
    monkeypatch.setattr("ldm_jax.loading._load_file", lambda *a, **k: pytest.fail("loaded the checkpoint"))
    with pytest.raises(CheckpointError, match=r"an SD 1\.x embedding \(768 wide\) for this tiny model \(text width 64"):
        ldm_jax.load(files["model"], embeddings=[_refusal(tmp_path, "SD 1.x for SD 2.x")[0][0]])
    from convert.embeddings import apply_embeddings

    with pytest.raises(CheckpointError, match="token 'mystyle' is a word the model already has an embedding for"):
        apply_embeddings(model, [files["pt"]])
    more = apply_embeddings(model, [(files["pt"], "zzother")])
    assert more.config.text.vocab_size == model.config.text.vocab_size + 2
    assert [e["token"] for e in more.metadata["embeddings"]] == ["mystyle", "<cat-toy>", "kohya_look", "zzother"]
    np.testing.assert_array_equal(more.tokenize("zzother mystyle")[0, 1:5], [49414, 49415, 49408, 49409])


def test_parse_embedding_arg(tmp_path):
    existing = tmp_path / "odd:name.pt"
    existing.write_bytes(b"")
    assert parse_embedding_arg(str(existing)) == (str(existing), None)
    assert parse_embedding_arg("dir/easynegative.safetensors") == ("dir/easynegative.safetensors", None)
    assert parse_embedding_arg("learned_embeds.bin:<cat-toy>") == ("learned_embeds.bin", "<cat-toy>")
    assert parse_embedding_arg("c:\\emb\\x.pt") == ("c:\\emb\\x.pt", None)
    with pytest.raises(ValueError, match="the token after ':' is empty"):
        parse_embedding_arg("x.pt: ")


def test_cli_embedding_changes_the_image_equals_the_python_api_and_is_named(files, model, tmp_path):
    prompt, request = "a red circle by kohya_look", dict(steps=2, height=16, width=16, seed=3)
    out = tmp_path / "out"
    rc, stdout, err = cli("txt2img", "--checkpoint", files["model"], "--prompt", prompt, "--out", out, "--steps", 2,
                          "--height", 16, "--width", 16, "--seed", 3, "--embedding", files["pt"],
                          "--embedding", files["bin"] + ":<cat-toy>", "--embedding", files["st"])
    assert rc == 0, err
    # the program compiled for the grown vocabulary while the weights loaded, and sampling compiled nothing more
    ready = re.search(r"program ready in ([0-9.]+)s", stdout)
    assert ready and f"(compile {ready.group(1)}s" in stdout, stdout
    (name,) = os.listdir(out)
    with Image.open(out / name) as im:
        image, text = np.asarray(im), dict(im.text)
    assert text["embeddings"] == "mystyle.pt:mystyle, learned_embeds.bin:<cat-toy>, kohya_look.safetensors:kohya_look"
    np.testing.assert_array_equal(image, ldm_jax.txt2img(model, prompt, **request)[0])
    plain = ldm_jax.txt2img(model, "a red circle by", **request)[0]
    assert np.abs(image.astype(np.int16) - plain).max() > 8


def test_cli_bad_embedding_fails_in_one_line_before_loading(files, tmp_path, monkeypatch):
    def slow_work(*_, **__):
        raise AssertionError("the model was loaded or compiled before the embedding was checked")

    monkeypatch.setattr("ldm_jax.warm_start.compile_while", slow_work)
    monkeypatch.setattr("ldm_jax.warm_start.load_while_compiling", slow_work)
    monkeypatch.setattr("ldm_jax.load", slow_work)
    for arg, needle in ((files["st"] + ":cat", "token 'cat' is already a token of CLIP's vocabulary"),
                        (str(tmp_path / "gone.pt"), "gone.pt: no such file"),
                        (files["model"], "is not a textual-inversion embedding")):
        rc, _, err = cli("txt2img", "--checkpoint", files["model"], "--embedding", arg, "--prompt", "x", "--out",
                         tmp_path / "o")
        assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o").exists()


def test_hosts_compare_embedding_files_and_tokens(files, monkeypatch):
    import types

    from ldm_jax import parallel
    from ldm_jax.cli import same_request

    seen = []
    monkeypatch.setattr(parallel, "check_same_everywhere", lambda settings, hint: seen.append(settings["files"]))
    for embedding in ([(files["pt"], None)], [(files["pt"], "mystyle")], [(files["pt"], "zzother")],
                      [(files["st"], None)]):
        args = types.SimpleNamespace(**{k: None for k in same_request.REQUEST_ARGS}, checkpoint=None, vae=None,
                                     lora=None, from_file=None, embedding=embedding)
        same_request.check_same_request(args, ["x"])
    assert seen[0] == seen[1] != seen[2] and seen[0] != seen[3]
