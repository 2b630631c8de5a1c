"""An audit of SD 2.x support as a new user meets it: one model under --prediction, whether read from its file, its
converted directory or its export (name, default size, the kind convert/export print and record); LoRAs of the
other model family (one line naming both); training a v model (the prediction said, and kept by --resume and
--export-only whatever the base file's weights suggest); verify's output row naming what the U-Net predicts.

Files are tiny SD 2.x-shaped CompVis files (tests/test_sd2.py's `sd2_state_dict`), without a stored config, so the
eps/v guess of `convert.prediction` runs (norm1_std > 0.09: v)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import ldm_jax
from convert.errors import CheckpointError
from convert.lora import check_lora_file
from convert.prediction import with_prediction
from convert.readers import read_state_dict
from convert.safetensors_io import read_safetensors, write_safetensors
from ldm_jax import configs
from tests.cli_run import cli
from tests.test_sd2 import INFERRED, sd2_state_dict


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{"v": a tiny SD 2.x file the weight test calls v, "eps": the same architecture called eps, "dir": the v file
    converted (no stored config in either file)."""
    root = tmp_path_factory.mktemp("sd2_audit")
    out = {"v": root / "v.safetensors", "eps": root / "eps.safetensors", "dir": root / "v_dir"}
    write_safetensors(out["v"], sd2_state_dict(INFERRED, seed=2, norm1_std=0.2))
    write_safetensors(out["eps"], sd2_state_dict(INFERRED, seed=3, norm1_std=0.01))
    rc, _, err = cli("convert", out["v"], out["dir"])
    assert rc == 0, err
    return out


# ------------------------------------------------------------------------------------------- one model, --prediction


def test_with_prediction_turns_one_sd2_flavour_into_the_other():
    """sd2 (eps, 512) <-> sd2-v (v, 768), as `infer_config(sd, prediction)` names an inferred config; the inpainting
    model, SD 1.x and custom configs (another name or size) keep their name and size."""
    assert with_prediction(configs.sd2_v(), "eps") == configs.sd2()
    assert with_prediction(configs.sd2(), "v") == configs.sd2_v()
    inpaint = with_prediction(configs.sd2_inpaint(), "v")
    assert (inpaint.name, inpaint.image_size, inpaint.schedule.prediction) == ("sd2-inpaint", 512, "v")
    import dataclasses

    trained = dataclasses.replace(configs.sd2_v(), image_size=64)  # `ldm-jax train` records its resolution
    assert (with_prediction(trained, "eps").name, with_prediction(trained, "eps").image_size) == ("sd2-v", 64)
    assert with_prediction(configs.sd1(), "v").name == "sd1"


def test_file_directory_and_export_load_as_the_same_model_under_prediction(files, tmp_path):
    """The v file, its converted directory and its export, each loaded with prediction="eps": the same config (it was
    sd2-v at 768x768 for the directory and the export, so txt2img's default size was 768 there and 512 for the
    file)."""
    rc, _, err = cli("export", files["dir"], tmp_path / "exported.safetensors")
    assert rc == 0, err
    want = ldm_jax.load(files["v"], prediction="eps").config
    assert (want.name, want.image_size, want.schedule.prediction) == ("sd2", 512, "eps")
    for path in (files["dir"], tmp_path / "exported.safetensors"):
        assert ldm_jax.load(path, prediction="eps").config == want, path
        assert ldm_jax.load(path).config.name == "sd2-v"
    # the directory's recorded guess is replaced by what was given
    assert ldm_jax.load(files["dir"]).metadata["prediction_note"].startswith("prediction v (as the 768x768")
    given = ldm_jax.load(files["dir"], prediction="eps").metadata["prediction_note"]
    assert given == "prediction eps (given; not inferred from the weights)"


def test_png_text_names_the_model_and_its_prediction(files, tmp_path):
    """An image made with --prediction can be reproduced from its PNG text: it names the model and the prediction."""
    from PIL import Image

    for prediction, model in (("v", "sd2-v"), ("eps", "sd2")):
        out = tmp_path / prediction
        rc, _, err = cli("txt2img", "--checkpoint", files["dir"], "--prompt", "a", "--steps", 2, "--height", 16,
                         "--width", 16, "--prediction", prediction, "--out", out)
        assert rc == 0, err
        (png,) = os.listdir(out)
        with Image.open(out / png) as im:
            assert (im.text["model"], im.text["prediction"]) == (model, prediction)


def test_convert_and_export_name_the_kind_the_model_predicts(files, tmp_path):
    """`--prediction eps` on a file guessed v: "sd2", not "sd2-v", in the printed line and in what is recorded (it
    said sd2-v next to "prediction eps (given...)"); likewise exporting the converted v directory as eps."""
    rc, out, err = cli("convert", files["v"], tmp_path / "conv", "--prediction", "eps")
    assert rc == 0, err
    assert ": sd2, raw U-Net" in out and "prediction eps (given" in out, out
    meta = json.loads((tmp_path / "conv" / "metadata.json").read_text())
    assert meta["kind"] == meta["config_name"] == "sd2"
    for src, name in ((files["v"], "file"), (files["dir"], "dir")):
        out_file = tmp_path / f"{name}.safetensors"
        rc, out, err = cli("export", src, out_file, "--prediction", "eps")
        assert rc == 0, err
        assert ": sd2, raw U-Net" in out, out
        header = read_safetensors(out_file)[1]
        config = json.loads(header["ldm_jax.config"])
        assert header["ldm_jax.kind"] == config["name"] == "sd2" and config["image_size"] == 512, name
        assert config["schedule"]["prediction"] == "eps"
    rc, out, err = cli("export", files["eps"], tmp_path / "as_v.safetensors", "--prediction", "v")
    assert rc == 0 and ": sd2-v, raw U-Net" in out, out + err


# ------------------------------------------------------------------------------------------- LoRAs of the other family


def _lora(path, text_width: int, context_width: int, loha: bool = False):
    """A kohya file adapting one text-encoder q_proj and one U-Net cross-attention to_k (inputs of those widths)."""
    rng = np.random.default_rng(0)
    out = {}
    for name, width in (("lora_te_text_model_encoder_layers_0_self_attn_q_proj", text_width),
                        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", context_width)):
        rows = text_width if "_te_" in name else 320
        if loha:
            out.update({f"{name}.hada_w1_a": rng.standard_normal((rows, 2)), f"{name}.hada_w1_b":
                        rng.standard_normal((2, width)), f"{name}.hada_w2_a": rng.standard_normal((rows, 2)),
                        f"{name}.hada_w2_b": rng.standard_normal((2, width))})
        else:
            out.update({f"{name}.lora_down.weight": rng.standard_normal((2, width)),
                        f"{name}.lora_up.weight": rng.standard_normal((rows, 2))})
        out[f"{name}.alpha"] = np.array(1.0)
    write_safetensors(path, {k: np.asarray(v, np.float16) for k, v in out.items()})
    return path


@pytest.mark.parametrize("loha", [False, True])
def test_lora_of_the_other_family_is_one_line_naming_both(tmp_path, loha):
    sd1 = _lora(tmp_path / "sd1.safetensors", 768, 768, loha)
    sd2 = _lora(tmp_path / "sd2.safetensors", 1024, 1024, loha)
    check_lora_file(sd2, configs.sd2_v())
    check_lora_file(sd1, configs.sd1_inpaint())
    with pytest.raises(CheckpointError, match=r"^LoRA file .*sd1\.safetensors: an SD 1\.x LoRA \(lora_te_text_model_"
                                              r"encoder_layers_0_self_attn_q_proj takes 768-wide text features\) and "
                                              r"this model is SD 2\.x \(1024-wide text encoder\); use a LoRA trained "
                                              r"for SD 2\.x$"):
        check_lora_file(sd1, configs.sd2())
    with pytest.raises(CheckpointError, match=r"an SD 2\.x LoRA .* this model is SD 1\.x \(768-wide text encoder\)"):
        check_lora_file(sd2, configs.sd1())
    unet_only = {k: v for k, v in read_state_dict(sd1).items() if k.startswith("lora_unet_")}
    write_safetensors(tmp_path / "unet_only.safetensors", unet_only)
    with pytest.raises(CheckpointError, match=r"an SD 1\.x LoRA \(lora_unet_\S+attn2_to_k takes 768-wide text "
                                              r"features\) and this model is SD 2\.x \(1024-wide cross-attention"):
        check_lora_file(tmp_path / "unet_only.safetensors", configs.sd2())


def test_lora_of_another_model_on_a_file_without_config_fails_at_merge_with_the_same_line(files, tmp_path):
    """A file without a stored config: the LoRA can only be checked once the model's config is inferred (the
    merge); the family line comes from there too."""
    lora = _lora(tmp_path / "sd1.safetensors", 768, 768)
    with pytest.raises(CheckpointError, match=r"^LoRA file .*: a LoRA for another model: lora_te_text_model_encoder_"
                                              r"layers_0_self_attn_q_proj takes 768-wide text features, this model's "
                                              r"text encoder is 64-wide$"):
        ldm_jax.load(files["eps"], loras=[lora])


def test_sdxl_lora_message_does_not_call_every_model_sd1(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    write_safetensors(path, {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.zeros((2, 768),
                                                                                                       np.float16)})
    with pytest.raises(CheckpointError, match=r"an SDXL LoRA \(two text encoders, lora_te1_\*/lora_te2_\*\) and this "
                                              r"model is SD 2\.x \(one text encoder\); use a LoRA trained for SD 2\.x$"):
        check_lora_file(path, configs.sd2())


# ------------------------------------------------------------------------------------------- training a v model


def test_train_says_the_prediction_and_resume_and_export_keep_the_runs(files, tmp_path):
    """The base guessed v: the run says so; resumed or exported with a base file guessed eps (same architecture), the
    U-Net keeps the run's v (it silently became eps: resumed, its loss target switched; exported, the model was
    sampled as eps); a contrary --prediction is refused."""
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a square {i}")
    run = tmp_path / "run"
    common = ["--data", data, "--out", run, "--resolution", 16, "--batch-size", 2, "--save-every", 1,
              "--no-progress", "--export", "none", "--snr-gamma", 5]
    rc, out, err = cli("train", "--checkpoint", files["v"], "--steps", 2, "--stop-after", 1, *common)
    assert rc == 0, err
    assert "training the U-Net to predict v (prediction v (as the 768x768 SD 2.x models): std 0.2000" in out, out
    rc, _, err = cli("train", "--checkpoint", files["eps"], "--steps", 2, "--resume", "--prediction", "eps", *common)
    assert rc == 2 and "the run trains its U-Net to predict v, not eps" in err, err
    rc, _, err = cli("train", "--export-only", "--out", run, "--checkpoint", files["eps"], "--prediction", "eps")
    assert rc == 2 and "the run trains its U-Net to predict v, not eps" in err, err
    rc, out, err = cli("train", "--export-only", "--out", run, "--checkpoint", files["eps"])
    assert rc == 0, err
    model = ldm_jax.load(run / "model")
    assert model.config.schedule.prediction == "v" and model.config.name == "sd2-v", model.config
    # --resume loads the base as the run did (`loop._train`: run_prediction, then load_base; not run again here: a
    # second compile of the train step costs ~15 s)
    from ldm_jax.train.base import load_base, prediction_line, run_prediction

    meta = {"config": {"schedule": {"prediction": "v"}}}
    assert run_prediction(meta, None, "--resume RUN") == run_prediction(meta, "v", "--resume RUN") == "v"
    assert run_prediction({"config": {}}, None, "--resume RUN") == "eps"  # a run recorded before v existed
    base = load_base(str(files["eps"]), None, 0, run_prediction(meta, None, "--resume RUN"))
    assert base.config.schedule.prediction == "v"
    assert prediction_line(base, "the run's") == "training the U-Net to predict v (the run's)"


def test_train_prediction_flag_on_a_preset():
    from ldm_jax.train.base import load_base, prediction_line

    sd = load_base(None, "tiny", prediction="v")
    assert sd.config.schedule.prediction == "v"
    assert prediction_line(sd, "--prediction") == "training the U-Net to predict v (--prediction)"
    assert prediction_line(load_base(None, "tiny"), None) is None  # SD 1.x-style eps: nothing to say


# ------------------------------------------------------------------------------------------- verify


def test_verify_names_the_unet_output_it_compares(files):
    rc, out, err = cli("verify", files["v"], "--components", "unet", "--latent-size", "8x8")
    assert rc == 0, out + err
    assert "v, t in {0, 999}" in out and "eps, t in" not in out, out
    assert os.path.exists(files["v"])
