"""Swapping the autoencoder for a standalone VAE file (`ldm_jax.load(..., vae=)`, `--vae`): `convert.vae_file`.

The main model is a random tiny checkpoint (`ldm-jax random-checkpoint`, config in its header); the VAE is a
separate random tiny autoencoder from the torch reference (other weights), saved alone with bare keys, with the
`first_stage_model.` prefix, or as a Lightning .ckpt carrying the training-only `loss.*` and `model_ema.*`
bookkeeping of the real fine-tuned VAE .ckpt files. Decode/encode parity against the labml autoencoder built from
the VAE file's own tensors: <= 1e-5 (DESIGN.md §5, as tests/test_parity_models.py).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import ldm_jax
from convert import torch_reference
from convert.errors import CheckpointError
from convert.mapping import LOSS_REASON, params_to_state_dict
from convert.safetensors_io import write_safetensors
from convert.vae_file import vae_params
from ldm_jax import configs
from ldm_jax.cli.main import main
from ldm_jax.models.build import abstract_params
from ldm_jax.pipelines import Timings, txt2img
from ldm_jax.pipelines.generate import adopt_programs
from ldm_jax.warm_start import load_while_compiling
from tests.parity import nchw, nhwc, rel_err
from tests.cli_run import cli

TINY = configs.tiny()
PREFIX = "first_stage_model."
TOL = 1e-5
REQUEST = dict(steps=2, height=16, width=16, seed=3)
PROMPT = ["a red circle"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{"model": tiny checkpoint, "vae": {prefixed key: array} of another autoencoder, "bare"/"prefixed"/"ckpt":
    the VAE files}."""
    d = tmp_path_factory.mktemp("vae")
    model = d / "tiny.safetensors"
    assert main(["random-checkpoint", str(model), "--preset", "tiny", "--seed", "3"]) == 0
    vae = torch_reference.random_state_dict(TINY, seed=9, components=("vae",))
    bare = {k[len(PREFIX):]: v for k, v in vae.items()}
    write_safetensors(d / "vae-ft-bare.safetensors", bare)
    write_safetensors(d / "vae-prefixed.safetensors", vae)
    training = {"loss.logvar": torch.tensor(0.0), "loss.perceptual_loss.net.slice1.0.weight": torch.ones(4, 3, 3, 3),
                "loss.discriminator.main.0.weight": torch.ones(8, 3, 4, 4), "model_ema.decay": torch.tensor(0.9999),
                "model_ema.num_updates": torch.tensor(840000, dtype=torch.int32)}
    torch.save({"state_dict": {**{k: torch.from_numpy(v) for k, v in bare.items()}, **training},
                "global_step": 840000}, d / "vae-ft-mse.ckpt")
    return {"dir": d, "model": str(model), "vae": vae, "bare": str(d / "vae-ft-bare.safetensors"),
            "prefixed": str(d / "vae-prefixed.safetensors"), "ckpt": str(d / "vae-ft-mse.ckpt")}


def _leaves(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_vae_is_file(sd, vae: dict[str, np.ndarray]) -> None:
    """sd's autoencoder, written back in the CompVis layout, is exactly the VAE file's tensors."""
    got = params_to_state_dict({"vae": sd.params["vae"]})
    assert got.keys() == vae.keys()
    for k in got:
        np.testing.assert_array_equal(got[k], vae[k], err_msg=k)


def assert_same(a, b) -> None:
    la, lb = _leaves(a), _leaves(b)
    assert la.keys() == lb.keys()
    for k in la:
        np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


@pytest.mark.parametrize("kind", ["bare", "prefixed", "ckpt"])
def test_vae_file_replaces_only_the_autoencoder(files, kind):
    own = ldm_jax.load(files["model"])
    sd = ldm_jax.load(files["model"], vae=files[kind])
    assert_vae_is_file(sd, files["vae"])
    assert not np.array_equal(_leaves(own.params["vae"])["['decoder']['conv_out']['bias']"],
                              _leaves(sd.params["vae"])["['decoder']['conv_out']['bias']"])
    assert_same(sd.params["unet"], own.params["unet"])
    assert_same(sd.params["text_encoder"], own.params["text_encoder"])
    assert sd.config == own.config and sd.metadata["source"] == "tiny.safetensors"
    assert sd.metadata["vae"] == os.path.basename(files[kind])
    assert f"mapped {len(files['vae'])} tensors" in sd.metadata["vae_report"]
    if kind == "ckpt":  # the training-only tensors are ignored, each with its reason
        assert f"ignored 3: {LOSS_REASON}" in sd.metadata["vae_report"]
        assert "ignored 2: EMA bookkeeping" in sd.metadata["vae_report"]


def test_decode_and_encode_match_the_torch_autoencoder_built_from_the_vae_file(files):
    sd = ldm_jax.load(files["model"], vae=files["ckpt"])
    ref = torch_reference.build(TINY, files["vae"], components=("vae",))["vae"]
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 8, 12, 4)).astype(np.float32)
    img = rng.uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
    with torch.no_grad():
        decoded = nhwc(ref.decode(nchw(z)))
        mean = nhwc(ref.encode(nchw(img)).mean)
    s = TINY.latent_scale
    assert rel_err(sd.decode_latents(sd.params, z * s), decoded) <= TOL
    assert rel_err(sd.encode_image(sd.params, img) / s, mean) <= TOL


def test_a_converted_directory_takes_a_vae_and_convert_bakes_one_in(files, tmp_path):
    plain, baked = tmp_path / "plain", tmp_path / "baked"
    assert cli("convert", files["model"], plain)[0] == 0
    sd = ldm_jax.load(plain, vae=files["bare"])
    assert_vae_is_file(sd, files["vae"])
    assert_same(sd.params["unet"], ldm_jax.load(files["model"]).params["unet"])
    assert sd.metadata["vae"] == "vae-ft-bare.safetensors"
    rc, out, err = cli("convert", files["model"], baked, "--vae", files["ckpt"])
    assert rc == 0, err
    assert "VAE from" in out and LOSS_REASON in out
    meta = json.loads((baked / "metadata.json").read_text())
    assert meta["vae"] == "vae-ft-mse.ckpt" and len(meta["vae_sha256"]) == 64
    assert meta["vae_report"]["mapped"] == len(files["vae"]) and meta["vae_report"]["ignored"][LOSS_REASON] == 3
    loaded = ldm_jax.load(baked)
    assert loaded.metadata["vae"] == "vae-ft-mse.ckpt"
    assert_vae_is_file(loaded, files["vae"])
    assert_same(loaded.params["unet"], sd.params["unet"])


def test_a_full_checkpoint_is_a_vae_source_for_its_autoencoder(files, tmp_path):
    other = tmp_path / "other.safetensors"
    assert main(["random-checkpoint", str(other), "--preset", "tiny", "--seed", "8"]) == 0
    sd = ldm_jax.load(files["model"], vae=other)
    assert_same(sd.params["vae"], ldm_jax.load(other).params["vae"])
    assert_same(sd.params["unet"], ldm_jax.load(files["model"]).params["unet"])
    assert "not the autoencoder" in sd.metadata["vae_report"]


def test_a_diffusers_layout_vae_is_refused_in_one_line(files, tmp_path):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    write_safetensors(path, {"encoder.conv_in.weight": np.zeros((32, 3, 3, 3), np.float32),
                             "encoder.down_blocks.0.resnets.0.norm1.weight": np.zeros(32, np.float32),
                             "decoder.up_blocks.0.resnets.0.norm1.weight": np.zeros(32, np.float32)})
    with pytest.raises(CheckpointError) as e:
        ldm_jax.load(files["model"], vae=path)
    message = str(e.value)
    assert "\n" not in message and "diffusers-layout VAE" in message and "expected the CompVis layout" in message
    assert str(path) in message


def test_a_lora_given_as_the_vae_is_named(files, tmp_path):
    path = tmp_path / "style.safetensors"
    write_safetensors(path, {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight":
                             np.zeros((4, 32, 1, 1), np.float32)})
    with pytest.raises(CheckpointError, match=r"style.safetensors: has no autoencoder tensors: this file is a LoRA "
                                              r"\(lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight\), "
                                              r"not a full checkpoint$"):
        ldm_jax.load(files["model"], vae=path)


def test_a_vae_of_other_shapes_is_refused_naming_the_tensor(files, tmp_path):
    wide = configs.tiny()
    wide = type(wide)(**{**wide.__dict__, "vae": type(wide.vae)(channels=64, channel_multipliers=(1, 2),
                                                                  n_resnet_blocks=1)})
    path = tmp_path / "wide.safetensors"
    zeros = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, np.float32), abstract_params(wide)["vae"])
    write_safetensors(path, {k[len(PREFIX):]: v for k, v in params_to_state_dict({"vae": zeros}).items()})
    named = r"wide\.safetensors: decoder\.conv_in\.bias: shape \(128,\) does not match the model's \(64,\)"
    with pytest.raises(CheckpointError, match=named):
        ldm_jax.load(files["model"], vae=path)  # the model declares its config: refused before loading
    with pytest.raises(CheckpointError, match=named + ".*4 latent channels, 32 base channels"):
        vae_params(path, abstract_params(TINY)["vae"])  # the mapping's own check (models without a declared config)


def test_a_missing_vae_file_is_refused(files, tmp_path):
    with pytest.raises(CheckpointError, match=r"VAE file .*nope\.safetensors: no such file"):
        ldm_jax.load(files["model"], vae=tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="is a directory"):
        ldm_jax.load(files["model"], vae=tmp_path)


def test_cli_txt2img_with_vae_names_it_in_the_png_text_and_draws_what_the_warm_started_api_draws(files, tmp_path):
    """--vae goes through `load_while_compiling`'s load_kwargs: the program compiled from the shapes is adopted
    (the VAE changes no shape), and the saved image is the one the U-Net's latents give through the file's VAE."""
    sd, ahead = load_while_compiling(files["model"], "txt2img", PROMPT, load_kwargs={"vae": files["ckpt"]}, **REQUEST)
    assert ahead.extra["overlapped"] and sd.metadata["vae"] == "vae-ft-mse.ckpt"
    assert_vae_is_file(sd, files["vae"])
    tm = Timings()
    want = txt2img(sd, PROMPT, timings=tm, **REQUEST)[0]
    assert tm.cached  # the adopted program, not compiled again
    own = sd.replace(params={**sd.params, "vae": ldm_jax.load(files["model"]).params["vae"]})
    assert adopt_programs(own, sd)
    without = txt2img(own, PROMPT, **REQUEST)[0]
    out = tmp_path / "out"
    rc, _, err = cli("txt2img", "--checkpoint", files["model"], "--vae", files["ckpt"], "--prompt", PROMPT[0],
                     "--steps", REQUEST["steps"], "--height", "16", "--width", "16", "--seed", REQUEST["seed"],
                     "--out", out)
    assert rc == 0, err
    (name,) = os.listdir(out)
    with Image.open(out / name) as im:
        assert im.text["vae"] == "vae-ft-mse.ckpt" and im.text["checkpoint"] == "tiny.safetensors"
        pixels = np.asarray(im).astype(np.int16)
    assert np.abs(pixels - want).max() <= 1  # XLA may round one level differently in another process
    assert np.abs(pixels - without).max() > 8  # the model's own VAE draws something else


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_cli_missing_vae_fails_in_one_line_before_loading_or_compiling(files, tmp_path, monkeypatch, mode):
    def slow_work(*_, **__):
        raise AssertionError("the model was loaded or compiled before the VAE file was checked")

    monkeypatch.setattr("ldm_jax.warm_start.load_while_compiling", slow_work)
    monkeypatch.setattr("ldm_jax.load", slow_work)
    extra = [] if mode == "txt2img" else ["--init", tmp_path / "init.png"]
    extra += ["--mask", tmp_path / "mask.png"] if mode == "inpaint" else []
    out = tmp_path / "out"
    rc, _, err = cli(mode, "--checkpoint", files["model"], "--vae", tmp_path / "missing.ckpt", "--prompt", "x",
                     "--out", out, *extra)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "VAE file" in err and "missing.ckpt: no such file" in err
    assert not out.exists()


def test_cli_convert_with_a_missing_or_diffusers_vae_writes_nothing(files, tmp_path):
    diffusers = tmp_path / "d.safetensors"
    write_safetensors(diffusers, {"decoder.up_blocks.0.resnets.0.conv1.weight": np.zeros((4, 4, 3, 3), np.float32)})
    for vae, needle in ((tmp_path / "missing.safetensors", "no such file"), (diffusers, "diffusers-layout")):
        out = tmp_path / "out"
        rc, _, err = cli("convert", files["model"], out, "--vae", vae)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
        assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith("out.")]
