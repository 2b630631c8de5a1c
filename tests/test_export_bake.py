"""`ldm-jax export` from a checkpoint file, and `--vae` / `--lora` baked in by `export` and `convert`.

Tiny-preset random weights: a .safetensors with the config in its header, a Lightning-style .ckpt of the same
weights with an EMA copy, schedule buffers and optimizer state, a bare CompVis VAE file of other random weights and
two kohya-ss LoRA files. Baked weights must be bit for bit those `ldm_jax.load(src, vae=, loras=)` gives.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
import pytest
import torch

import ldm_jax
from convert.keys import PREFIXES
from convert.mapping import params_to_state_dict
from convert.safetensors_io import read_safetensors, write_safetensors
from ldm_jax import configs
from ldm_jax.cli.cmd_convert import compvis_schedule_buffers
from ldm_jax.cli.main import main
from ldm_jax.loading import CONFIG_METADATA_KEY
from ldm_jax.models.build import random_params
from tests.cli_run import cli

TINY = configs.tiny()
UNET, VAE, TEXT = PREFIXES["unet"], PREFIXES["vae"], PREFIXES["text_encoder"]
LORA_MODULES = {  # kohya name: (CompVis key, down shape, up shape, alpha)
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        (UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", (4, 32), (32, 4), 2.0),
    "lora_unet_down_blocks_0_resnets_0_conv1": (UNET + "input_blocks.1.0.in_layers.2.weight", (3, 32, 3, 3),
                                                (32, 3, 1, 1), 1.0),
    "lora_te_text_model_encoder_layers_1_self_attn_q_proj":
        (TEXT + "encoder.layers.1.self_attn.q_proj.weight", (2, 64), (64, 2), None),
}
LORA2_MODULES = {"lora_unet_mid_block_attentions_0_proj_in": (UNET + "middle_block.1.proj_in.weight", (4, 64, 1, 1),
                                                              (64, 4, 1, 1), 4.0)}


def _lora(path, modules, seed):
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, (_, down, up, alpha) in modules.items():
        tensors[f"{name}.lora_down.weight"] = (0.3 * rng.standard_normal(down)).astype(np.float32)
        tensors[f"{name}.lora_up.weight"] = (0.3 * rng.standard_normal(up)).astype(np.float32)
        if alpha is not None:
            tensors[f"{name}.alpha"] = np.float32(alpha)
    write_safetensors(path, tensors)
    return str(path)


def _sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bake")
    sd = params_to_state_dict(random_params(TINY, 3))
    write_safetensors(d / "tiny.safetensors", sd, {CONFIG_METADATA_KEY: TINY.to_json(), "format": "pt"})
    ema = {"model_ema." + k[len("model."):].replace(".", ""): v + np.float32(0.5) for k, v in sd.items()
           if k.startswith(UNET)}
    buffers = {k: v.astype(np.float32) for k, v in compvis_schedule_buffers(TINY.schedule).items()}
    extra = {**ema, **buffers, "model_ema.decay": np.array(0.9999, np.float32),
             "model_ema.num_updates": np.array(1234, np.int32)}
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in {**sd, **extra}.items()},
                "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}}], "global_step": 1}, d / "tiny.ckpt")
    vae = params_to_state_dict({"vae": random_params(TINY, 9, components=("vae",))["vae"]})
    write_safetensors(d / "vae-ft.safetensors", {k[len(VAE):]: v for k, v in vae.items()})
    return {"dir": d, "model": str(d / "tiny.safetensors"), "ckpt": str(d / "tiny.ckpt"), "sd": sd, "ema": ema,
            "vae": str(d / "vae-ft.safetensors"), "vae_tensors": vae,
            "lora": _lora(d / "style.safetensors", LORA_MODULES, 1),
            "lora2": _lora(d / "detail.safetensors", LORA2_MODULES, 2)}


def run(*argv) -> str:
    rc, out, err = cli(*argv)
    assert rc == 0, err
    return out


def tensors(path) -> dict[str, np.ndarray]:
    return read_safetensors(path)[0]


def header(path) -> dict[str, str]:
    return read_safetensors(path)[1]


def assert_equal(got: dict, want: dict) -> None:
    """Same keys, same dtypes, same bits."""
    assert got.keys() == want.keys()
    for k in got:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert np.array_equal(np.asarray(got[k]).view(np.uint8), np.asarray(want[k]).view(np.uint8)), k


def compvis(sd) -> dict[str, np.ndarray]:
    return params_to_state_dict(jax.tree_util.tree_map(np.asarray, sd.params))


def _bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ------------------------------------------------------------------------------------- export from a file


def test_safetensors_file_exports_its_model_tensors_bit_exact_and_as_its_converted_directory(files, tmp_path):
    run("convert", files["model"], tmp_path / "conv")
    run("export", tmp_path / "conv", tmp_path / "from-dir.safetensors")
    out = run("export", files["model"], tmp_path / "from-file.safetensors")
    assert "446 tensors, float32" in out
    assert_equal(tensors(tmp_path / "from-file.safetensors"), files["sd"])
    assert _bytes(tmp_path / "from-file.safetensors") == _bytes(tmp_path / "from-dir.safetensors")
    meta = header(tmp_path / "from-file.safetensors")
    assert meta["ldm_jax.source"] == "tiny.safetensors" and meta["ldm_jax.source_sha256"] == _sha256(files["model"])
    assert not any(k.startswith(("ldm_jax.vae", "ldm_jax.loras")) for k in meta)  # nothing baked in
    run("export", files["model"], tmp_path / "half.safetensors", "--dtype", "fp16")
    run("export", tmp_path / "conv", tmp_path / "half-dir.safetensors", "--dtype", "fp16")
    assert_equal(tensors(tmp_path / "half.safetensors"), {k: v.astype(np.float16) for k, v in files["sd"].items()})
    assert _bytes(tmp_path / "half.safetensors") == _bytes(tmp_path / "half-dir.safetensors")


def test_ckpt_export_keeps_model_tensors_only_with_the_ema_unet_by_default(files, tmp_path):
    run("convert", files["ckpt"], tmp_path / "conv", "--preset", "tiny")
    run("export", tmp_path / "conv", tmp_path / "from-dir.safetensors")
    out = run("export", files["ckpt"], tmp_path / "ema.safetensors", "--preset", "tiny")
    assert "EMA U-Net" in out
    assert _bytes(tmp_path / "ema.safetensors") == _bytes(tmp_path / "from-dir.safetensors")
    by_ema_name = {"model_ema." + k[len("model."):].replace(".", ""): k for k in files["sd"] if k.startswith(UNET)}
    want = {**files["sd"], **{by_ema_name[k]: v for k, v in files["ema"].items()}}
    assert_equal(tensors(tmp_path / "ema.safetensors"), want)  # no model_ema.*, betas, optimizer state
    assert header(tmp_path / "ema.safetensors")["ldm_jax.ema"] == "true"
    run("export", files["ckpt"], tmp_path / "raw.safetensors", "--preset", "tiny", "--no-ema", "--dtype", "fp16")
    assert_equal(tensors(tmp_path / "raw.safetensors"), {k: v.astype(np.float16) for k, v in files["sd"].items()})
    assert header(tmp_path / "raw.safetensors")["ldm_jax.ema"] == "false"


# ------------------------------------------------------------------------------------- baking in LoRAs and a VAE


def test_export_lora_gives_the_weights_of_loading_with_the_lora_and_records_them(files, tmp_path):
    loras = [(files["lora"], 0.7), (files["lora2"], 1.0)]
    out = run("export", files["model"], tmp_path / "styled.safetensors", "--lora", f"{files['lora']}:0.7",
              "--lora", files["lora2"])
    assert f"LoRA {files['lora']} merged with scale 0.7 (sha256 {_sha256(files['lora'])})" in out
    want = ldm_jax.load(files["model"], loras=loras)
    got = tensors(tmp_path / "styled.safetensors")
    assert_equal(got, compvis(want))
    adapted = {key for key, *_ in [*LORA_MODULES.values(), *LORA2_MODULES.values()]}
    assert {k for k in got if not np.array_equal(got[k], files["sd"][k])} == adapted
    baked = ldm_jax.load(tmp_path / "styled.safetensors")
    assert_equal(compvis(baked), compvis(want))  # loaded back: the same params as merging at sampling time
    record = [{"name": "style.safetensors", "scale": 0.7, "sha256": _sha256(files["lora"])},
              {"name": "detail.safetensors", "scale": 1.0, "sha256": _sha256(files["lora2"])}]
    assert json.loads(header(tmp_path / "styled.safetensors")["ldm_jax.loras"]) == record
    assert baked.metadata["loras"] == record
    # fp16: merged into the fp32 weights, then rounded once (not rounded, merged and rounded again)
    run("export", files["model"], tmp_path / "half.safetensors", "--dtype", "fp16", "--lora", f"{files['lora']}:0.7",
        "--lora", files["lora2"])
    assert_equal(tensors(tmp_path / "half.safetensors"), {k: v.astype(np.float16) for k, v in compvis(want).items()})


def test_sampling_a_baked_checkpoint_names_its_baked_and_its_runtime_loras(files, tmp_path):
    """The PNG text lists the LoRAs the checkpoint carries, then those merged by --lora (a runtime --lora used to
    replace the baked list in `sd.metadata`, and the PNG text named only --lora's files)."""
    from PIL import Image

    run("export", files["model"], tmp_path / "styled.safetensors", "--lora", f"{files['lora']}:0.7")
    baked = ldm_jax.load(tmp_path / "styled.safetensors", loras=[(files["lora2"], 0.5)])
    assert [(e["name"], e["scale"]) for e in baked.metadata["loras"]] == [("style.safetensors", 0.7),
                                                                          ("detail.safetensors", 0.5)]
    run("txt2img", "--checkpoint", tmp_path / "styled.safetensors", "--lora", f"{files['lora2']}:0.5", "--prompt",
        "a", "--steps", "2", "--height", "16", "--width", "16", "--out", tmp_path / "out")
    (png,) = os.listdir(tmp_path / "out")
    assert Image.open(tmp_path / "out" / png).text["loras"] == "style.safetensors:0.7, detail.safetensors:0.5"


def test_export_vae_writes_the_vae_files_tensors_and_names_it(files, tmp_path):
    out = run("export", files["model"], tmp_path / "vae.safetensors", "--vae", files["vae"])
    assert f"VAE from {files['vae']} (sha256 {_sha256(files['vae'])})" in out
    got = tensors(tmp_path / "vae.safetensors")
    assert_equal({k: v for k, v in got.items() if k.startswith(VAE)}, files["vae_tensors"])
    assert_equal({k: v for k, v in got.items() if not k.startswith(VAE)},
                 {k: v for k, v in files["sd"].items() if not k.startswith(VAE)})
    baked = ldm_jax.load(tmp_path / "vae.safetensors")
    assert_equal(compvis(baked), compvis(ldm_jax.load(files["model"], vae=files["vae"])))
    meta = header(tmp_path / "vae.safetensors")
    assert meta["ldm_jax.vae"] == "vae-ft.safetensors" and meta["ldm_jax.vae_sha256"] == _sha256(files["vae"])
    assert baked.metadata["vae"] == "vae-ft.safetensors"  # what txt2img's PNG text names without --vae


def test_convert_lora_and_vae_bakes_them_and_its_export_is_the_direct_export(files, tmp_path):
    lora = f"{files['lora']}:-0.5"
    out = run("convert", files["model"], tmp_path / "conv", "--lora", lora, "--vae", files["vae"])
    assert "LoRA" in out and "merged with scale -0.5" in out and "VAE from" in out
    want = ldm_jax.load(files["model"], vae=files["vae"], loras=[(files["lora"], -0.5)])
    loaded = ldm_jax.load(tmp_path / "conv")
    assert_equal(compvis(loaded), compvis(want))
    meta = json.loads((tmp_path / "conv" / "metadata.json").read_text())
    assert meta["loras"] == [{"name": "style.safetensors", "scale": -0.5, "sha256": _sha256(files["lora"])}]
    assert meta["vae"] == "vae-ft.safetensors" and meta["vae_sha256"] == _sha256(files["vae"])
    assert loaded.metadata["loras"] == meta["loras"] and loaded.metadata["vae"] == "vae-ft.safetensors"
    run("export", tmp_path / "conv", tmp_path / "from-dir.safetensors")  # the record travels with the weights
    run("export", files["model"], tmp_path / "direct.safetensors", "--lora", lora, "--vae", files["vae"])
    assert _bytes(tmp_path / "from-dir.safetensors") == _bytes(tmp_path / "direct.safetensors")
    # a LoRA on top of a baked source: listed after the recorded one
    run("export", tmp_path / "direct.safetensors", tmp_path / "more.safetensors", "--lora", files["lora2"])
    names = [e["name"] for e in json.loads(header(tmp_path / "more.safetensors")["ldm_jax.loras"])]
    assert names == ["style.safetensors", "detail.safetensors"]
    assert_equal(tensors(tmp_path / "more.safetensors"),
                 compvis(ldm_jax.load(tmp_path / "direct.safetensors", loras=[files["lora2"]])))


def test_convert_fp16_with_a_lora_rounds_the_merged_weight_once(files, tmp_path):
    run("convert", files["model"], tmp_path / "half", "--dtype", "fp16", "--lora", files["lora"])
    merged = compvis(ldm_jax.load(files["model"], loras=[files["lora"]]))
    got = compvis(ldm_jax.load(tmp_path / "half", param_dtype="float16"))
    assert_equal(got, {k: v.astype(np.float16) for k, v in merged.items()})


# ------------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def bad(files):
    d = files["dir"]
    big = dict(files["sd"])
    key = TEXT + "encoder.layers.0.mlp.fc1.weight"
    big[key] = big[key].copy()
    big[key][0, 0] = 1e5
    write_safetensors(d / "big.safetensors", big, {CONFIG_METADATA_KEY: TINY.to_json()})
    assert main(["convert", str(d / "big.safetensors"), str(d / "big")]) == 0
    misfit = _lora(d / "misfit.safetensors", {"lora_unet_down_blocks_5_resnets_0_conv1": (
        None, (4, 32, 3, 3), (32, 4, 1, 1), 1.0)}, 3)
    return {"big": str(d / "big.safetensors"), "big_dir": str(d / "big"), "misfit": misfit, "key": key}


@pytest.mark.parametrize("argv,needle", [
    (["export", "{model}", "{out}.ckpt"], "the output must be a .safetensors file"),
    (["export", "{model}", "{model}"], "is the source file"),
    (["export", "{big_dir}", "{big_dir}/x.safetensors"], "is inside the converted directory"),
    (["export", "{model}", "{out}", "--lora", "{dir}/missing.safetensors"], "missing.safetensors"),
    (["export", "{model}", "{out}", "--lora", "{misfit}"], "no such module in this model"),
    (["export", "{ckpt}", "{out}", "--preset", "tiny", "--lora", "{misfit}"], "no such module in this model"),
    (["export", "{model}", "{out}", "--vae", "{lora}"], "has no autoencoder tensors"),
    (["export", "{model}", "{out}", "--ema"], "has no model_ema.* weights"),
    (["export", "{big_dir}", "{out}", "--preset", "tiny"], "--preset/--config apply to a checkpoint file"),
    (["export", "{model}", "{out}", "--lora", "{lora}:x"], "the scale after ':' must be a number"),
    (["convert", "{model}", "{out_dir}", "--lora", "{misfit}"], "no such module in this model"),
    (["convert", "{model}", "{out_dir}", "--lora", "{dir}/missing.safetensors"], "missing.safetensors"),
])
def test_refusals_are_one_line_before_the_weights_are_read_and_leave_nothing(files, bad, tmp_path, monkeypatch,
                                                                            argv, needle):
    import convert.mapping
    import convert.orbax_io
    import convert.readers

    fail = lambda *a, **k: pytest.fail("the weights were read or hashed before the refusal")  # noqa: E731
    monkeypatch.setattr(convert.mapping, "state_dict_to_params", fail)
    monkeypatch.setattr(convert.orbax_io, "read_converted", fail)
    monkeypatch.setattr(convert.readers, "sha256_file", fail)
    names = {**files, **bad, "out": tmp_path / "out.safetensors", "out_dir": tmp_path / "conv"}
    before = sorted(os.listdir(files["dir"]))
    rc, _, err = cli(*[a.format(**names) for a in argv])
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and needle in lines[0], err
    assert lines[0].startswith(f"ldm-jax {argv[0]}: error: ")
    assert os.listdir(tmp_path) == [] and sorted(os.listdir(files["dir"])) == before


@pytest.mark.parametrize("src", ["big", "big_dir"])
@pytest.mark.parametrize("lora", [False, True])
def test_fp16_overflow_is_refused_naming_the_tensor_and_writes_nothing(files, bad, tmp_path, src, lora):
    extra = ["--lora", files["lora"]] if lora else []
    rc, _, err = cli("export", bad[src], tmp_path / "half.safetensors", "--dtype", "fp16", *extra)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and bad["key"] in lines[0] and "does not fit float16" in lines[0], err
    assert os.listdir(tmp_path) == []
    if src == "big":  # convert --lora --dtype fp16 checks the merged weights likewise
        rc, _, err = cli("convert", bad[src], tmp_path / "conv", "--dtype", "fp16", *extra)
        assert rc == 2 and bad["key"] in err and "does not fit float16" in err, err
        assert os.listdir(tmp_path) == []
