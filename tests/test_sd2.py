"""SD 2.x checkpoints (CompVis layout, OpenCLIP text tower under `cond_stage_model.model.`): key table, detection
and config inference, parity, export round trip, CLI.

Parity references read the same file as `ldm_jax.load`, through diffusers' OWN single-file conversion (so the key
mapping is independent of ours): `convert_ldm_unet_checkpoint` with an SD 2.x original config (num_head_channels,
use_linear_in_transformer) into `UNet2DConditionModel`, and `convert_open_clip_checkpoint` (offline: it takes the
transformers `CLIPTextModel` we build, hidden_act="gelu") for the text tower, whose output SD 2.x reads at the
penultimate layer through the final LayerNorm. Measure: max|jax - torch| / max|torch| <= 1e-5, fp32, highest matmul
precision (tests/conftest.py).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import pytest
import torch

import ldm_jax
from convert.detect import detect_kind, infer_config
from convert.errors import CheckpointError
from convert.keys import key_table
from convert.mapping import params_to_state_dict, state_dict_to_params
from convert.prediction import rule_key
from convert.readers import read_state_dict
from convert.safetensors_io import write_safetensors
from ldm_jax import configs
from ldm_jax.configs import AutoencoderConfig, ModelConfig, TextEncoderConfig, UNetConfig
from ldm_jax.models.build import abstract_params, random_params
from ldm_jax.tokenizer import ClipTokenizer
from tests.parity import nchw, nhwc, original_config, rel_err, saved_with_config
from tests.cli_run import cli

TOL = 1e-5
U, OC = "model.diffusion_model.", "cond_stage_model.model."
# 2 and 4 U-Net heads of width 32, 2 text heads, 3 text layers read at the penultimate one
TINY2 = ModelConfig(
    name="tiny-sd2",
    unet=UNetConfig(channels=64, channel_multipliers=(1, 2), n_res_blocks=1, attention_levels=(0, 1), n_heads=None,
                    d_head=32, d_cond=64, use_linear_proj=True),
    vae=AutoencoderConfig(channels=32, channel_multipliers=(1, 2), n_resnet_blocks=1),
    text=TextEncoderConfig(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=2, hidden_act="gelu",
                           skip_last_layers=1, pad_token_id=0, key_layout="open_clip"),
)
# what inference gives a file of this size without a stored config: heads of width 64 (1 and 2; 1 text head)
INFERRED = dataclasses.replace(
    TINY2, name="sd2", unet=dataclasses.replace(TINY2.unet, d_head=64),
    text=dataclasses.replace(TINY2.text, num_heads=1))


def sd2_state_dict(config: ModelConfig, seed: int = 0, norm1_std: float | None = None) -> dict[str, np.ndarray]:
    """A CompVis SD 2.x state dict with random (perturbed) weights, OpenCLIP text names and the contrastive head
    SD does not use; norm1_std: the std of the tensor the v-prediction test reads."""
    sd = params_to_state_dict(random_params(config, seed), text_layout="open_clip")
    rng = np.random.default_rng(seed)
    sd[OC + "text_projection"] = rng.standard_normal((config.text.hidden_size, 32)).astype(np.float32)
    sd[OC + "logit_scale"] = np.array(4.6052, np.float32)
    if norm1_std is not None:
        key = rule_key(sd)
        x = rng.standard_normal(sd[key].shape)
        sd[key] = (x / x.std() * norm1_std).astype(np.float32)
    return sd


def expected_open_clip_keys(t: TextEncoderConfig) -> set[str]:
    """The OpenCLIP text-tower names (open_clip TextTransformer / CLIP, as FrozenOpenCLIPEmbedder stores them)."""
    keys = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"}
    for i in range(t.num_layers):
        for name in ("ln_1", "ln_2", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"):
            keys |= {f"transformer.resblocks.{i}.{name}.weight", f"transformer.resblocks.{i}.{name}.bias"}
        keys |= {f"transformer.resblocks.{i}.attn.in_proj_weight", f"transformer.resblocks.{i}.attn.in_proj_bias"}
    return {OC + k for k in keys}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(state dict, path of the file with its config in the header, the loaded model)."""
    return saved_with_config(tmp_path_factory.mktemp("sd2"), "tiny_sd2.safetensors", sd2_state_dict(TINY2, seed=1),
                             TINY2)


# ------------------------------------------------------------------------------------------- key table, mapping


def test_open_clip_table_names_shapes_and_stacked_qkv():
    shapes = abstract_params(configs.sd2(), components=("text_encoder",))["text_encoder"]
    table = key_table("text_encoder", shapes, text_layout="open_clip")
    stored = {e.key: e.stored_shape for e in table}
    assert set(stored) == expected_open_clip_keys(configs.sd2().text) and len(stored) == 24 * 12 + 4
    assert stored[OC + "positional_embedding"] == (77, 1024) and stored[OC + "token_embedding.weight"] == (49408, 1024)
    qkv = [e for e in table if e.key == OC + "transformer.resblocks.7.attn.in_proj_weight"]
    assert [(e.flax_path[-2], e.part, e.parts) for e in sorted(qkv, key=lambda e: e.part)] == [
        ("q_proj", 0, 3), ("k_proj", 1, 3), ("v_proj", 2, 3)]
    assert stored[qkv[0].key] == (3072, 1024) and stored[OC + "transformer.resblocks.7.mlp.c_fc.weight"] == (4096, 1024)
    with pytest.raises(ValueError, match="key_layout must be one of 'transformers', 'open_clip'"):
        TextEncoderConfig(key_layout="openclip")


def test_mapping_round_trip_ignores_contrastive_head_and_uses_ema(tiny):
    sd, _, _ = tiny
    shapes = abstract_params(TINY2)
    params, report = state_dict_to_params(sd, shapes)
    assert set(report.ignored) == {OC + "text_projection", OC + "logit_scale"}
    assert "OpenCLIP text projection" in report.ignored[OC + "text_projection"]
    assert len(report.mapped) == len(sd) - 2 and not report.unexpected  # one in_proj tensor: reported once
    back = params_to_state_dict(params, text_layout="open_clip")
    assert back.keys() == sd.keys() - {OC + "text_projection", OC + "logit_scale"}
    for k in back:
        assert back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k]), k
    q = params["text_encoder"]["encoder"]["layers_2"]["self_attn"]["q_proj"]
    d = TINY2.text.hidden_size  # q is the first third of in_proj (torch nn.MultiheadAttention order q, k, v)
    np.testing.assert_array_equal(q["kernel"], sd[OC + "transformer.resblocks.2.attn.in_proj_weight"][:d].T)
    np.testing.assert_array_equal(q["bias"], sd[OC + "transformer.resblocks.2.attn.in_proj_bias"][:d])
    ema = {e.ema_key: sd[e.key] + 1 for e in key_table("unet", shapes["unet"])}  # EMA: U-Net only, as SD 1.x
    params, report = state_dict_to_params({**sd, **ema}, shapes)
    assert report.used_ema
    first = params["unet"]["input_blocks_0_0"]["kernel"]
    np.testing.assert_array_equal(first, (sd[U + "input_blocks.0.0.weight"] + 1).transpose(2, 3, 1, 0))
    with pytest.raises(CheckpointError, match=r"in_proj_weight: shape \(64, 64\) does not match the model's "
                                              r"\(192, 64\)"):
        bad = dict(sd)
        bad[OC + "transformer.resblocks.0.attn.in_proj_weight"] = np.zeros((64, 64), np.float32)
        state_dict_to_params(bad, shapes)


# ------------------------------------------------------------------------------------------- parity


def test_unet_matches_diffusers_through_its_own_conversion(tiny):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    sd, _, model = tiny
    u = TINY2.unet
    original = original_config(TINY2)  # as Stability-AI's v2-inference.yaml spells an SD 2.x U-Net
    dconfig = create_unet_diffusers_config_from_ldm(original, sd, image_size=64)
    assert dconfig["use_linear_projection"] and list(dconfig["attention_head_dim"]) == [2, 4]  # heads per level
    ref = UNet2DConditionModel(**dconfig).eval()
    ref.load_state_dict(convert_ldm_unet_checkpoint({k: torch.from_numpy(v) for k, v in sd.items()}, dconfig),
                        strict=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, u.d_cond)).astype(np.float32)
    t = np.array([3, 999])
    with torch.no_grad():
        want = nhwc(ref(nchw(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx)).sample)
    err = rel_err(model.predict_noise(model.params, x, t, ctx), want)
    print(f"SD 2.x U-Net vs diffusers: max rel err {err:.2e}")
    assert err <= TOL


def test_text_encoder_matches_transformers_through_diffusers_open_clip_conversion(tiny):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    sd, _, model = tiny
    t = TINY2.text
    ref = CLIPTextModel(CLIPTextConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, max_position_embeddings=t.max_length,
        hidden_act="gelu", layer_norm_eps=t.layer_norm_eps, attn_implementation="eager")).eval()
    converted = convert_open_clip_checkpoint(ref, {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()})
    converted.pop("text_projection.weight", None)  # CLIPTextModelWithProjection's; SD does not use it
    level = "" if any(k.startswith("text_model.") for k in ref.state_dict()) else "text_model."  # transformers v5
    loaded = ref.load_state_dict({k[len(level):]: v for k, v in converted.items()}, strict=False)
    assert not loaded.unexpected_keys and all(k.endswith("position_ids") for k in loaded.missing_keys)
    ids = model.tokenize(["a photograph of an astronaut riding a horse", "a red circle, 8k"])
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
        final_ln = (ref.text_model if hasattr(ref, "text_model") else ref).final_layer_norm
        want = final_ln(out.hidden_states[-2]).numpy()  # FrozenOpenCLIPEmbedder(layer="penultimate")
    got = model.encode_text(model.params, ids)
    err = rel_err(got, want)
    print(f"SD 2.x text encoder vs transformers: max rel err {err:.2e}")
    assert err <= TOL
    assert rel_err(got, out.last_hidden_state.numpy()) > 1e-2  # the last layer's output is a different answer


def test_tokenizer_pads_with_zero_as_open_clip_tokenize(tiny):
    _, _, model = tiny
    tok = ClipTokenizer()
    long = "a " + "very " * 100 + "long prompt"
    ids = model.tokenize(["a red circle", long, ""])
    for prompt, row in zip(["a red circle", long, ""], ids):
        # open_clip.tokenize: [sot] + tokens + [eot], zeros after; too long: the first 77, the last set to eot
        want = [tok.bos_token_id] + tok.encode(prompt) + [tok.eos_token_id]
        if len(want) > 77:
            want = want[:77]
            want[-1] = tok.eos_token_id
        np.testing.assert_array_equal(row, want + [0] * (77 - len(want)))
    assert ids[1, -1] == tok.eos_token_id and (ids[0, 5:] == 0).all()


# ------------------------------------------------------------------------------------------- detection


def _full_size_fake(config: ModelConfig, norm1_std: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Shapes-only stand-ins (zero-cost broadcast views) of a full-size SD 2.x file, plus the one tensor whose values
    the v-prediction test reads, and the extras real files carry."""
    shapes = abstract_params(config)
    sd = {e.key: np.broadcast_to(np.float32(0), e.stored_shape)
          for c in shapes for e in key_table(c, shapes[c], text_layout="open_clip")}
    sd[OC + "text_projection"], sd[OC + "logit_scale"] = np.zeros((1024, 1024), np.float32), np.float32(4.6)
    sd["betas"] = np.zeros(1000, np.float32)
    key = U + "output_blocks.11.1.transformer_blocks.0.norm1.bias"  # ComfyUI's SD20.model_type key
    assert key in sd and rule_key(sd) == key
    x = np.random.default_rng(seed).standard_normal(320)
    sd[key] = (x / x.std() * norm1_std).astype(np.float32)
    return sd


@pytest.mark.parametrize("preset,std,kind", [("sd2", 0.05, "sd2"), ("sd2-v", 0.12, "sd2-v"),
                                             ("sd2-inpaint", 0.12, "sd2-inpaint")])
def test_full_size_kinds_and_configs_equal_the_presets(preset, std, kind):
    sd = _full_size_fake(configs.preset(preset), std)
    assert detect_kind(sd) == kind
    assert infer_config(sd) == configs.preset(preset)
    if kind != "sd2-inpaint":  # the override: eps <-> v, with that flavour's name and resolution
        other = "sd2" if kind == "sd2-v" else "sd2-v"
        assert infer_config(sd, prediction=configs.preset(other).schedule.prediction) == configs.preset(other)


def test_v_rule_threshold_and_incomplete_or_mixed_files():
    assert detect_kind(_full_size_fake(configs.sd2(), 0.0899)) == "sd2"
    assert detect_kind(_full_size_fake(configs.sd2(), 0.0901)) == "sd2-v"
    sd = _full_size_fake(configs.sd2(), 0.05)
    no_text = {k: v for k, v in sd.items() if not k.startswith(OC)}
    with pytest.raises(CheckpointError, match=r"^incomplete SD 2\.x checkpoint: .*without its OpenCLIP text encoder"):
        detect_kind(no_text)
    with pytest.raises(CheckpointError, match="two text encoders"):
        detect_kind({**sd, "cond_stage_model.transformer.text_model.final_layer_norm.weight": np.zeros(768)})
    with pytest.raises(ValueError, match="prediction must be one of eps, v"):
        infer_config(sd, prediction="x0")


def test_small_file_without_stored_config_is_inferred_with_its_prediction(tmp_path):
    path = tmp_path / "eps.safetensors"
    write_safetensors(path, sd2_state_dict(INFERRED, seed=2, norm1_std=0.01))
    eps = ldm_jax.load(path)
    assert eps.config == INFERRED and eps.config.schedule.prediction == "eps" and eps.config.image_size == 512
    assert eps.metadata["prediction_note"].startswith("prediction eps (as the 512x512 SD 2.x base models): std 0.0100")
    v_path = tmp_path / "v.safetensors"
    write_safetensors(v_path, sd2_state_dict(INFERRED, seed=2, norm1_std=0.2))
    v = ldm_jax.load(v_path)
    assert v.config.name == "sd2-v" and v.config.schedule.prediction == "v" and v.config.image_size == 768
    assert ldm_jax.load(v_path, prediction="eps").config == INFERRED
    assert ldm_jax.load(path, prediction="v").config == v.config
    assert ldm_jax.load(v_path, prediction="eps").metadata["prediction_note"].startswith("prediction eps (given")


# ------------------------------------------------------------------------------------------- export, CLI


def test_params_to_state_dict_writes_open_clip_names_bit_exact(tiny):
    sd, _, model = tiny
    written = params_to_state_dict(model.params, text_layout=model.config.text.key_layout)
    assert {k for k in written if k.startswith("cond_stage_model.")} == expected_open_clip_keys(TINY2.text)
    for k in written:
        np.testing.assert_array_equal(written[k], sd[k], err_msg=k)


def test_cli_export_writes_open_clip_names_bit_exact(tiny, tmp_path):
    sd, path, model = tiny
    written = params_to_state_dict(model.params, text_layout=model.config.text.key_layout)
    out = tmp_path / "exported.safetensors"
    rc, _, err = cli("export", path, out)
    assert rc == 0, err
    exported = read_state_dict(out)
    assert {k for k in exported if k.startswith("cond_stage_model.")} == expected_open_clip_keys(TINY2.text)
    assert exported.keys() == written.keys()
    for k in exported:
        assert exported[k].dtype == sd[k].dtype and np.array_equal(exported[k], sd[k]), k
    again = ldm_jax.load(out)
    assert again.config == TINY2
    for a, b in zip(jax.tree_util.tree_leaves(again.params), jax.tree_util.tree_leaves(model.params)):
        np.testing.assert_array_equal(a, b)
    # --prediction v: recorded in the exported config (a later load needs no flag); the tensors are the same
    rc, _, err = cli("export", path, tmp_path / "v.safetensors", "--prediction", "v")
    assert rc == 0, err
    assert ldm_jax.load(tmp_path / "v.safetensors").config.schedule.prediction == "v"
    assert all(np.array_equal(t, exported[k]) for k, t in read_state_dict(tmp_path / "v.safetensors").items())


def test_cli_convert_and_txt2img(tmp_path):
    src = tmp_path / "tiny_sd2.safetensors"  # no stored config: the CLI infers SD 2.x and says which prediction
    write_safetensors(src, sd2_state_dict(INFERRED, seed=4, norm1_std=0.01))
    rc, out, err = cli("convert", src, tmp_path / "conv")
    assert rc == 0, err
    assert "sd2" in out and "ignored 1: OpenCLIP logit scale" in out
    assert "prediction eps (as the 512x512 SD 2.x base models): std 0.0100 of " in out
    rc, out, err = cli("convert", src, tmp_path / "conv_v", "--prediction", "v")
    assert rc == 0 and "prediction v (given" in out, err
    assert ldm_jax.load(tmp_path / "conv_v").config == dataclasses.replace(
        INFERRED, name="sd2-v", schedule=configs.sd2_v().schedule, image_size=768)
    converted = ldm_jax.load(tmp_path / "conv")
    assert converted.config == INFERRED
    direct = ldm_jax.load(src)
    for a, b in zip(jax.tree_util.tree_leaves(converted.params), jax.tree_util.tree_leaves(direct.params)):
        np.testing.assert_array_equal(a, b)
    rc, out, err = cli("txt2img", "--checkpoint", src, "--prompt", "a red circle", "--steps", 2, "--height", 16,
                       "--width", 16, "--seed", 0, "--out", tmp_path / "img")
    assert rc == 0, err
    assert "tiny_sd2.safetensors: prediction eps (as the 512x512 SD 2.x base models)" in err
    assert len(os.listdir(tmp_path / "img")) == 1
    # --prediction on the sampling commands: for an inferred config (the file) and a declared one (the directory,
    # whose program compiles while the weights load and must be the v program): the same v image from both
    from PIL import Image

    pixels = {}
    for name, checkpoint in (("file", src), ("dir", tmp_path / "conv")):
        rc, out, err = cli("txt2img", "--checkpoint", checkpoint, "--prompt", "a red circle", "--steps", 2, "--height",
                           16, "--width", 16, "--seed", 0, "--prediction", "v", "--out", tmp_path / name)
        assert rc == 0, err
        (png,) = os.listdir(tmp_path / name)
        pixels[name] = np.asarray(Image.open(tmp_path / name / png))
    assert "program ready" in out, out  # the directory's v program compiled while its weights loaded
    (eps_png,) = os.listdir(tmp_path / "img")
    np.testing.assert_array_equal(pixels["file"], pixels["dir"])
    assert not np.array_equal(pixels["file"], np.asarray(Image.open(tmp_path / "img" / eps_png)))


def test_verify_builds_diffusers_and_open_clip_references(tiny):
    """`ldm-jax verify` on an SD 2.x file: diffusers' U-Net and the OpenCLIP tower (through diffusers' conversions)."""
    sd, path, _ = tiny
    rc, out, err = cli("verify", path, "--components", "unet,text_encoder", "--latent-size", "8x8")
    assert rc == 0, out + err
    assert "parity OK" in out and "layer 2 + final LN" in out and out.count("all ") == 2, out  # weights rows: equal


def test_kohya_lora_merges_into_linear_proj_and_the_open_clip_tower(tiny, tmp_path):
    """kohya's SD 2.x LoRAs name modules as for SD 1.x (diffusers U-Net paths, transformers CLIPTextModel names);
    SD 2.x's proj_in is a Linear (2-D LoRA matrices) and q, k, v live in one packed OpenCLIP in_proj in the file:
    each merges into its own Flax parameter, W += scale * alpha / rank * up @ down."""
    _, path, plain = tiny
    rng = np.random.default_rng(5)
    down_u, up_u = rng.standard_normal((4, 64)).astype(np.float32), rng.standard_normal((64, 4)).astype(np.float32)
    down_t, up_t = rng.standard_normal((2, 64)).astype(np.float32), rng.standard_normal((64, 2)).astype(np.float32)
    lora = tmp_path / "sd2-style.safetensors"
    write_safetensors(lora, {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": down_u,
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": up_u,
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": np.array(2.0, np.float32),
        "lora_te_text_model_encoder_layers_1_self_attn_k_proj.lora_down.weight": down_t,
        "lora_te_text_model_encoder_layers_1_self_attn_k_proj.lora_up.weight": up_t})
    base = params_to_state_dict(plain.params)  # transformers names: k_proj on its own
    merged = params_to_state_dict(ldm_jax.load(path, loras=[(str(lora), 0.5)]).params)
    proj_in = U + "input_blocks.1.1.proj_in.weight"
    k_proj = "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.k_proj.weight"
    np.testing.assert_allclose(merged[proj_in], base[proj_in] + 0.5 * 2.0 / 4 * up_u @ down_u, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(merged[k_proj], base[k_proj] + 0.5 * up_t @ down_t, rtol=1e-6, atol=1e-6)
    assert {k for k in base if not np.array_equal(base[k], merged[k])} == {proj_in, k_proj}
