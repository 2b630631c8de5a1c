"""kohya-ss LoRA files (`ldm_jax.load(..., loras=)`, `--lora FILE[:SCALE]`): `convert.lora`.

Ground truth for the names: diffusers' own single-file conversion (`convert_ldm_unet_checkpoint`) of a random
CompVis U-Net, loaded strictly into a `UNet2DConditionModel` of the matching config, and transformers'
`CLIPTextModel`. Every module kohya's LoRA/LoCon can adapt (the Linear/Conv2d inside Transformer2DModel,
ResnetBlock2D, Downsample2D and Upsample2D; conv_in, conv_out, time_embedding) must map to the CompVis key holding
the identical tensor. The merge is checked against kohya's formula computed with torch (its conv2d for 3x3 LoCon).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from PIL import Image

import ldm_jax
from convert import torch_reference
from convert.errors import CheckpointError
from convert.lora import parse_lora_arg
from convert.lora_names import clip_modules, diffusers_unet_modules, module_table
from convert.mapping import params_to_state_dict
from convert.readers import read_state_dict
from convert.safetensors_io import write_safetensors
from ldm_jax import configs
from ldm_jax.cli.main import main
from tests.cli_run import cli
from tests.parity import original_config

TINY = configs.tiny()
# level 0 without attention and 2 resnets a level: the other index rules (upsampler conv at .1, n_res + 1 = 3)
PARTIAL = dataclasses.replace(TINY, unet=dataclasses.replace(TINY.unet, attention_levels=(1,), n_res_blocks=2))
UNET = "model.diffusion_model."
TEXT = "cond_stage_model.transformer."
TOL = 1e-6  # float32 merge vs torch's float32 kohya formula: max |difference| (weights ~0.1, updates ~0.1)
KOHYA_UNET_PARENTS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
KOHYA_UNET_TOP = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")


def _diffusers_unet(config):
    """(UNet2DConditionModel with diffusers' conversion of a random CompVis U-Net loaded strictly, the CompVis sd)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    original = original_config(config)
    compvis = torch_reference.random_state_dict(config, seed=5, components=("unet",))
    dconfig = create_unet_diffusers_config_from_ldm(original, compvis, image_size=64)
    converted = convert_ldm_unet_checkpoint({k: torch.from_numpy(v) for k, v in compvis.items()}, dconfig)
    model = UNet2DConditionModel(**dconfig)
    model.load_state_dict(converted, strict=True)  # the names are diffusers' real module names
    return model, compvis


def _kohya_unet_targets(model) -> dict[str, torch.Tensor]:
    """{diffusers module path: weight} of every module kohya's LoRA/LoCon networks adapt."""
    out = {}
    for name, module in model.named_modules():
        if type(module).__name__ in KOHYA_UNET_PARENTS:
            for child, sub in module.named_modules():
                if child and isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)):
                    out[f"{name}.{child}"] = sub.weight
    for name in KOHYA_UNET_TOP:
        out[name] = model.get_submodule(name).weight
    return out


@pytest.mark.parametrize("config", [TINY, PARTIAL], ids=["tiny", "partial-attention"])
def test_every_diffusers_unet_module_maps_to_the_compvis_key_of_its_tensor(config):
    model, compvis = _diffusers_unet(config)
    targets = _kohya_unet_targets(model)
    table = module_table(config)
    assert len(targets) > 50 and any("upsamplers" in n for n in targets) and any("conv_shortcut" in n for n in targets)
    for name, weight in targets.items():
        lora = "lora_unet_" + name.replace(".", "_")
        assert lora in table, f"{name} has no mapping"
        key = table[lora].key
        np.testing.assert_array_equal(compvis[key], weight.detach().numpy(), err_msg=f"{name} -> {key}")
    ours = {n for n in diffusers_unet_modules(config.unet) if f"lora_unet_{n.replace('.', '_')}" in table}
    assert ours == set(targets)  # nothing mapped that diffusers lacks
    # each CompVis weight is the target of one module only
    assert len({e.key for e in table.values()}) == len(table)


def test_text_encoder_names_are_transformers_clip_names():
    from transformers import CLIPTextConfig, CLIPTextModel

    t = TINY.text
    model = CLIPTextModel(CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                                         intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
                                         num_attention_heads=t.num_heads, max_position_embeddings=t.max_length))
    compvis = torch_reference.random_state_dict(TINY, seed=6, components=("text_encoder",))
    # transformers 4.x names CLIPTextModel's modules text_model.encoder...: kohya's lora_te_text_model_* names come
    # from there; transformers 5 drops the text_model level (the CompVis file keeps it)
    level = "" if any(k.startswith("text_model.") for k in model.state_dict()) else "text_model."
    loaded = model.load_state_dict({k[len(TEXT + level):]: torch.from_numpy(v) for k, v in compvis.items()},
                                   strict=False)
    assert not loaded.unexpected_keys and {k.rsplit(".", 1)[-1] for k in loaded.missing_keys} <= {"position_ids"}
    targets = {level + n: m.weight for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and type(model.get_submodule(n.rsplit(".", 1)[0])).__name__
               in ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")}
    assert len(targets) == 6 * t.num_layers and set(targets) == set(clip_modules(t))
    table = module_table(TINY)
    for name, weight in targets.items():
        entry = table["lora_te_" + name.replace(".", "_")]
        assert entry.key == f"{TEXT}{name}.weight" and entry.key.startswith(TEXT + "text_model.")
        np.testing.assert_array_equal(compvis[entry.key], weight.detach().numpy(), err_msg=name)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    model = d / "tiny.safetensors"
    assert main(["random-checkpoint", str(model), "--preset", "tiny", "--seed", "3"]) == 0
    rng = np.random.default_rng(1)
    r = lambda *s: (0.3 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    modules = {  # name: (CompVis key, down, up, alpha)
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            ("input_blocks.1.1.transformer_blocks.0.attn1.to_q", r(4, 32), r(32, 4), 2.0),
        "lora_unet_mid_block_attentions_0_proj_in": ("middle_block.1.proj_in", r(4, 64, 1, 1), r(64, 4, 1, 1), None),
        "lora_unet_down_blocks_0_resnets_0_conv1": ("input_blocks.1.0.in_layers.2", r(3, 32, 3, 3), r(32, 3, 1, 1),
                                                    1.0),
        "lora_unet_down_blocks_0_downsamplers_0_conv": ("input_blocks.2.0.op", r(2, 32, 3, 3), r(32, 2, 1, 1), 4.0),
        "lora_unet_up_blocks_0_upsamplers_0_conv": ("output_blocks.1.2.conv", r(2, 64, 3, 3), r(64, 2, 1, 1), 2.0),
        "lora_unet_up_blocks_1_resnets_0_conv_shortcut": ("output_blocks.2.0.skip_connection", r(2, 96, 1, 1),
                                                          r(32, 2, 1, 1), 2.0),
        "lora_unet_up_blocks_1_resnets_1_time_emb_proj": ("output_blocks.3.0.emb_layers.1", r(4, 128), r(32, 4), 8.0),
        "lora_te_text_model_encoder_layers_1_self_attn_q_proj": ("text_model.encoder.layers.1.self_attn.q_proj",
                                                                 r(2, 64), r(64, 2), 1.0),
        "lora_te_text_model_encoder_layers_0_mlp_fc1": ("text_model.encoder.layers.0.mlp.fc1", r(4, 64), r(128, 4),
                                                        4.0),
    }
    tensors = {}
    for name, (_, down, up, alpha) in modules.items():
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            tensors[f"{name}.alpha"] = np.float32(alpha)
    write_safetensors(d / "style.safetensors", tensors)
    return {"dir": d, "model": str(model), "lora": str(d / "style.safetensors"), "modules": modules}


def _kohya_delta(down, up, alpha) -> np.ndarray:
    """kohya-ss networks/merge_lora.py: the update of one weight, in torch float32."""
    down, up = torch.from_numpy(down), torch.from_numpy(up)
    rank = down.shape[0]
    scale = (rank if alpha is None else alpha) / rank
    if down.dim() == 2:
        d = up @ down
    elif down.shape[2:4] == (1, 1):
        d = (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
    else:
        d = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    return (d * scale).numpy()


def test_merge_changes_exactly_the_adapted_tensors_by_kohyas_formula(files):
    base = read_state_dict(files["model"])
    sd = ldm_jax.load(files["model"], loras=[(files["lora"], 0.7)])
    got = params_to_state_dict(sd.params)
    assert got.keys() == base.keys()
    changed = {}
    for name, (key, down, up, alpha) in files["modules"].items():
        full = (TEXT if name.startswith("lora_te_") else UNET) + key + ".weight"
        changed[full] = base[full] + 0.7 * _kohya_delta(down, up, alpha)
    for key in got:
        if key in changed:
            assert np.abs(got[key] - changed[key]).max() <= TOL, key
            assert not np.array_equal(got[key], base[key]), key
        else:
            np.testing.assert_array_equal(got[key], base[key], err_msg=key)  # bit-identical
    assert sd.metadata["loras"] == [{"name": "style.safetensors", "scale": 0.7}]
    twice = ldm_jax.load(files["model"], loras=[files["lora"], (files["lora"], -1.0)])  # bare path: scale 1
    for key in changed:
        assert np.abs(params_to_state_dict(twice.params)[key] - base[key]).max() <= TOL


def _write(path, tensors):
    write_safetensors(path, {k: np.asarray(v, np.float32) for k, v in tensors.items()})
    return str(path)


@pytest.mark.parametrize("tensors,needle", [
    ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.zeros((4, 64))},
     "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight: an SDXL LoRA"),
    ({"lora_unet_down_blocks_5_resnets_0_conv1.lora_down.weight": np.zeros((4, 32, 3, 3)),
      "lora_unet_down_blocks_5_resnets_0_conv1.lora_up.weight": np.zeros((32, 4, 1, 1))},
     "lora_unet_down_blocks_5_resnets_0_conv1: no such module in this model"),
    ({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": np.zeros((4, 32, 1, 1)),
      "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": np.zeros((64, 4, 1, 1))},
     "lora_unet_mid_block_attentions_0_proj_in: lora_down (4, 32, 1, 1) and lora_up (64, 4, 1, 1) do not fit the "
     "model's model.diffusion_model.middle_block.1.proj_in.weight (64, 64, 1, 1)"),
    ({"lora_unet_mid_block_attentions_0_proj_out.hada_w1_a": np.zeros((64, 4))},
     "lora_unet_mid_block_attentions_0_proj_out: has no .hada_w1_b"),
    ({"unet.mid_block.attentions.0.proj_in.lora_A.weight": np.zeros((4, 64))}, "is not a kohya-ss LoRA"),
    ({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": np.zeros((4, 64, 1, 1))},
     "lora_unet_mid_block_attentions_0_proj_in: has no .lora_up.weight"),
])
def test_bad_loras_are_refused_in_one_line_naming_the_key(files, tmp_path, tensors, needle):
    path = _write(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(CheckpointError) as e:
        ldm_jax.load(files["model"], loras=[(path, 1.0)])
    assert needle in str(e.value) and "\n" not in str(e.value) and f"LoRA file {path}: " in str(e.value)


def test_parse_lora_arg(tmp_path):
    existing = tmp_path / "style.safetensors"
    existing.write_bytes(b"")
    with pytest.raises(ValueError, match="the scale after ':' must be a number"):  # FILE:typo, not "no such file"
        parse_lora_arg(f"{existing}:abc")
    assert parse_lora_arg("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_arg("dir/a.safetensors:0.6") == ("dir/a.safetensors", 0.6)
    assert parse_lora_arg("a.safetensors:-1e-1") == ("a.safetensors", -0.1)
    assert parse_lora_arg("c:/x/a.safetensors") == ("c:/x/a.safetensors", 1.0)  # no number after ':'
    for bad in ("a.safetensors:1.2.3", ":0.5", "a.safetensors:1e999"):
        with pytest.raises(ValueError):
            parse_lora_arg(bad)


def _txt2img(files, out, *extra):
    rc, _, err = cli("txt2img", "--checkpoint", files["model"], "--prompt", "a red circle", "--steps", 2,
                     "--height", 16, "--width", 16, "--seed", 3, "--out", out, *extra)
    assert rc == 0, err
    (name,) = os.listdir(out)
    with Image.open(out / name) as im:
        return np.asarray(im).astype(np.int16), dict(im.text)


def test_cli_lora_changes_the_image_and_scale_0_is_the_plain_model(files, tmp_path):
    plain, text = _txt2img(files, tmp_path / "plain")
    assert "loras" not in text
    styled, text = _txt2img(files, tmp_path / "styled", "--lora", files["lora"] + ":2")
    assert text["loras"] == "style.safetensors:2"
    assert np.abs(styled - plain).max() > 8
    zero, text = _txt2img(files, tmp_path / "zero", "--lora", files["lora"] + ":0", "--lora", files["lora"])
    assert text["loras"] == "style.safetensors:0, style.safetensors:1"
    again, _ = _txt2img(files, tmp_path / "zero1", "--lora", files["lora"] + ":0")
    np.testing.assert_array_equal(again, plain)


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
@pytest.mark.parametrize("kind", ["missing", "sdxl", "vae", "scale"])
def test_cli_bad_lora_fails_in_one_line_before_loading(files, tmp_path, monkeypatch, mode, kind):
    def slow_work(*_, **__):
        raise AssertionError("the model was loaded or compiled before the LoRA file was checked")

    monkeypatch.setattr("ldm_jax.warm_start.load_while_compiling", slow_work)
    monkeypatch.setattr("ldm_jax.load", slow_work)
    vae = torch_reference.random_state_dict(TINY, seed=9, components=("vae",)) if kind == "vae" else None
    path, needle = {
        "missing": (str(tmp_path / "missing.safetensors"), "missing.safetensors: no such file"),
        "sdxl": (_write(tmp_path / "xl.safetensors", {
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.zeros((4, 64))}), "an SDXL LoRA"),
        "vae": (vae and _write(tmp_path / "vae.safetensors", {k.split(".", 1)[1]: v for k, v in vae.items()}),
                "is not a kohya-ss LoRA (lora_unet_*/lora_te_* keys): this file is an autoencoder (VAE) file"),
        "scale": (files["lora"] + ":1.2.3", "argument --lora: "),
    }[kind]
    extra = [] if mode == "txt2img" else ["--init", tmp_path / "init.png"]
    extra += ["--mask", tmp_path / "mask.png"] if mode == "inpaint" else []
    out = tmp_path / "out"
    rc, _, err = cli(mode, "--checkpoint", files["model"], "--lora", path, "--prompt", "x", "--out", out, *extra)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err
    assert not out.exists()
