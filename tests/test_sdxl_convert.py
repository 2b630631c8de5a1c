"""SDXL 1.0 base checkpoints in sgm's layout (Stability-AI/generative-models `DiffusionEngine`): key table, detection
and config inference, parity, export round trip, CLI.

An SDXL file holds the U-Net (`model.diffusion_model.*`, CompVis names plus `label_emb`, the vector conditioning)
and the VAE (`first_stage_model.*`) as SD 1.x does, and its two text encoders under `conditioner.embedders.`: CLIP
ViT-L/14 at `0.transformer.text_model.*` (transformers names) and OpenCLIP ViT-bigG/14 at `1.model.*` (OpenCLIP
names, with the `text_projection` SDXL pools through). Parity references read the same tensors through diffusers'
OWN single-file conversions (`convert.torch_reference`): `convert_ldm_unet_checkpoint` into a "text_time"
`UNet2DConditionModel`, `convert_ldm_clip_checkpoint` into `CLIPTextModel` and `convert_open_clip_checkpoint` into
`CLIPTextModelWithProjection`. Measure: max|jax - torch| / max|torch| <= 1e-5, fp32, highest matmul precision
(tests/conftest.py). One module-scoped file (`tiny-xl`, config in its header) serves every test.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch

import ldm_jax
from convert import torch_reference
from convert.detect import detect_kind, infer_config
from convert.errors import CheckpointError
from convert.keys import key_table, layout_of
from convert.mapping import params_to_state_dict, state_dict_to_params
from convert.readers import read_state_dict
from convert.safetensors_io import write_safetensors
from ldm_jax import configs
from ldm_jax.models.build import abstract_params, random_params
from tests.cli_run import cli
from tests.parity import nchw, nhwc, rel_err, saved_with_config, sgm_original_config

TOL = 1e-5
U, V = "model.diffusion_model.", "first_stage_model."
T1, OC2 = "conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."
IGNORED = {OC2 + "logit_scale", T1 + "embeddings.position_ids"}  # in real files; SDXL uses neither
XL = configs.tiny_xl()
PROMPTS = ["a photograph of an astronaut riding a horse", "", "a " + "very " * 100 + "long prompt"]


def sgm_state_dict(config, seed: int = 0) -> dict[str, np.ndarray]:
    """An sgm-layout SDXL state dict with random (perturbed) weights and the extras real files carry."""
    sd = params_to_state_dict(random_params(config, seed), text_layout="sgm")
    sd[OC2 + "logit_scale"] = np.array(4.6052, np.float32)
    sd[T1 + "embeddings.position_ids"] = np.arange(config.text.max_length, dtype=np.int64)[None]
    return sd


def expected_text_keys(config) -> set[str]:
    """Both towers' names as sgm's FrozenCLIPEmbedder (transformers CLIPTextModel) and FrozenOpenCLIPEmbedder2
    (open_clip TextTransformer / CLIP) store them."""
    keys = {T1 + k for k in ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
                             "final_layer_norm.weight", "final_layer_norm.bias")}
    for i in range(config.text.num_layers):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "layer_norm1",
                     "layer_norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"{T1}encoder.layers.{i}.{name}.{w}" for w in ("weight", "bias")}
    keys |= {OC2 + k for k in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
                               "text_projection")}
    for i in range(config.text_2.num_layers):
        for name in ("ln_1", "ln_2", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"):
            keys |= {f"{OC2}transformer.resblocks.{i}.{name}.{w}" for w in ("weight", "bias")}
        keys |= {f"{OC2}transformer.resblocks.{i}.attn.in_proj_{w}" for w in ("weight", "bias")}
    return keys


def table(config, shapes) -> dict:
    return {e.key: e for c in shapes for e in key_table(c, shapes[c], text_layout=layout_of(config))}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(state dict, path of the file with its config in the header, the loaded model)."""
    return saved_with_config(tmp_path_factory.mktemp("sdxl"), "tiny_xl.safetensors", sgm_state_dict(XL, seed=1), XL)


@pytest.fixture(scope="module")
def full():
    """Shapes-only stand-ins (zero-cost broadcast views) of `sd_xl_base_1.0.safetensors`'s tensors."""
    shapes = abstract_params(configs.sdxl())
    sd = {k: np.broadcast_to(np.float32(0), e.stored_shape) for k, e in table(configs.sdxl(), shapes).items()}
    sd[OC2 + "logit_scale"] = np.float32(4.6)
    sd[T1 + "embeddings.position_ids"] = np.zeros((1, 77), np.int64)
    return sd


# ------------------------------------------------------------------------------------------- key table, mapping


def test_sgm_key_table_names_shapes_and_diffusers_model_type(full):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    entries = table(configs.sdxl(), abstract_params(configs.sdxl()))
    count = lambda prefix: sum(k.startswith(prefix) for k in entries)  # noqa: E731
    # sd_xl_base_1.0.safetensors: 2515 tensors = these 2513 + logit_scale + position_ids
    assert (count(U), count(V), count(T1), count(OC2), len(entries)) == (1680, 248, 196, 389, 2513)
    assert {k for k in entries if k.startswith("conditioner.")} == expected_text_keys(configs.sdxl())
    assert entries[U + "label_emb.0.0.weight"].stored_shape == (1280, 2816)
    assert entries[U + "label_emb.0.2.weight"].stored_shape == (1280, 1280)
    proj = entries[OC2 + "text_projection"]  # x @ P: the Flax kernel itself, no transpose
    assert (proj.flax_path, proj.layout, proj.stored_shape) == (("text_projection", "kernel"), "same", (1280, 1280))
    assert entries[OC2 + "transformer.resblocks.31.attn.in_proj_weight"].stored_shape == (3840, 1280)
    assert entries[T1 + "encoder.layers.11.mlp.fc1.weight"].stored_shape == (3072, 768)
    assert infer_diffusers_model_type(full) == "xl_base"  # diffusers' own test of the layout
    tiny = table(XL, abstract_params(XL))
    assert {k for k in tiny if k.startswith("conditioner.")} == expected_text_keys(XL)


def test_mapping_round_trip_maps_the_projection_as_stored(tiny):
    sd, _, _ = tiny
    params, report = state_dict_to_params(sd, abstract_params(XL))
    assert set(report.ignored) == IGNORED and not report.unexpected
    assert "logit scale" in report.ignored[OC2 + "logit_scale"] and len(report.mapped) == len(sd) - 2
    np.testing.assert_array_equal(params["text_encoder_2"]["text_projection"]["kernel"], sd[OC2 + "text_projection"])
    q = params["text_encoder_2"]["encoder"]["layers_1"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(q, sd[OC2 + "transformer.resblocks.1.attn.in_proj_weight"][:32].T)
    back = params_to_state_dict(params, text_layout="transformers")  # SDXL params: always sgm's layout
    assert back.keys() == sd.keys() - IGNORED
    for k in back:
        assert back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k]), k


# ------------------------------------------------------------------------------------------- detection


def test_full_size_file_is_sdxl_and_infers_the_preset(full):
    assert detect_kind(full) == "sdxl"
    assert infer_config(full) == configs.sdxl()
    assert infer_config(full, prediction="v").schedule.prediction == "v"


def test_nine_channel_sdxl_file_is_sdxl_inpaint(full):
    """`sd_xl_base_1.0_inpainting_0.1`: the base layout with a 9-channel first conv (x_t, mask, masked latents)."""
    first = U + "input_blocks.0.0.weight"
    inpaint = {**full, first: np.broadcast_to(np.float32(0), (320, 9, 3, 3))}
    assert detect_kind(inpaint) == "sdxl-inpaint"
    assert infer_config(inpaint) == configs.sdxl_inpaint() and configs.sdxl_inpaint().is_inpainting
    with pytest.raises(CheckpointError, match=r"^unsupported SDXL U-Net with 8 input channels$"):
        detect_kind({**full, first: np.broadcast_to(np.float32(0), (320, 8, 3, 3))})


def test_small_file_without_stored_config_is_inferred_as_sdxl(tmp_path):
    """No config in the header: the shapes as found (heads of width 64), the rest as the sdxl preset."""
    text = dataclasses.replace(XL.text, hidden_size=64, num_heads=1)
    text_2 = dataclasses.replace(XL.text_2, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=1,
                                 projection_dim=48)
    unet = dataclasses.replace(XL.unet, d_head=64, d_cond=128, adm_in_channels=48 + 6 * 256)
    inferable = dataclasses.replace(configs.sdxl(), unet=unet, vae=XL.vae, text=text, text_2=text_2)
    path = tmp_path / "plain.safetensors"
    write_safetensors(path, sgm_state_dict(inferable, seed=2))
    model = ldm_jax.load(path)
    assert model.config == inferable and model.metadata["kind"] == "sdxl" and "prediction_note" not in model.metadata


def _refiner(sd):
    """The SDXL refiner's layout: only the OpenCLIP tower, at embedder 0 (without label_emb: sgm's SD 2.1)."""
    out = {k: v for k, v in sd.items() if not k.startswith("conditioner.")}
    out.update({k.replace(OC2, "conditioner.embedders.0.model."): v for k, v in sd.items() if k.startswith(OC2)})
    return out


@pytest.mark.parametrize("change,message", [
    (lambda sd: {k: v for k, v in _refiner(sd).items() if not k.startswith(U + "label_emb.")},
     r"^this file is a Stable Diffusion 2\.x model in sgm's layout .*sgm-layout SD 2\.x checkpoints are not supported"),
    (lambda sd: {k: v for k, v in sd.items() if not k.startswith(OC2)},
     r"^incomplete SDXL checkpoint: .*conditioner\.embedders\.1\.model\.\* is missing"),
    (lambda sd: {**sd, "cond_stage_model.transformer.text_model.final_layer_norm.weight": np.zeros(8, np.float32)},
     r"^this file holds text encoders of two layouts"),
])
def test_other_sgm_kinds_are_refused_in_one_line(tiny, change, message):
    with pytest.raises(CheckpointError, match=message) as e:
        detect_kind(change(tiny[0]))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------- parity


def test_diffusers_unet_config_is_diffusers_own_for_the_real_model(full):
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    ours = torch_reference.diffusers_unet_config(configs.sdxl())
    theirs = create_unet_diffusers_config_from_ldm(sgm_original_config(configs.sdxl()), full)
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    assert {k: norm(v) for k, v in ours.items() if k != "norm_num_groups"} == {
        k: norm(theirs[k]) for k in ours if k != "norm_num_groups"}
    assert theirs["addition_embed_type"] == "text_time" and theirs["transformer_layers_per_block"] == [1, 2, 10]


def test_unet_with_vector_conditioning_matches_diffusers(tiny):
    sd, _, model = tiny
    ref = torch_reference.build(XL, sd, components=("unet",))["unet"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, XL.unet.d_cond)).astype(np.float32)
    pooled = rng.standard_normal((2, XL.text_2.projection_dim)).astype(np.float32)
    t = np.array([3, 999])
    original, crop, target = (1024, 768), (32, 16), (64, 128)
    time_ids = torch.tensor([original + crop + target] * 2, dtype=torch.float32)  # diffusers' add_time_ids order
    with torch.no_grad():
        want = nhwc(ref(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), torch.from_numpy(pooled), time_ids))
    predict = jax.jit(model.predict_noise)  # compiled once for both calls (eager: ~3x slower on 2 cores)
    y = model.vector_conditioning(pooled, target, original, crop)
    err = rel_err(predict(model.params, x, t, ctx, y), want)
    print(f"SDXL U-Net vs diffusers: max rel err {err:.2e}")
    assert err <= TOL
    other = model.vector_conditioning(pooled, target, original, (0, 0))  # y is used: another crop, another output
    assert rel_err(predict(model.params, x, t, ctx, other), want) > 1e-3


def test_both_text_encoders_match_transformers_through_diffusers_conversions(tiny):
    sd, _, model = tiny
    refs = torch_reference.build(XL, sd, components=("text_encoder", "text_encoder_2"))
    clip_l, big_g = (refs[c].inner() for c in ("text_encoder", "text_encoder_2"))  # the transformers models
    ids = model.tokenize(PROMPTS)  # CLIP-L's padding (EOS); bigG reads them padded with 0, as open_clip.tokenize
    eos = np.argmax(ids == XL.text.eos_token_id, axis=1)
    ids_2 = np.where(np.arange(77)[None] > eos[:, None], 0, ids)
    assert ids_2[1, 2] == 0 and ids[1, 2] == XL.text.eos_token_id and ids_2[2, -1] == XL.text.eos_token_id
    with torch.no_grad():
        out_1 = clip_l(input_ids=torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
        out_2 = big_g(input_ids=torch.from_numpy(ids_2.astype(np.int64)), output_hidden_states=True)
    ctx, pooled = jax.jit(lambda p, i: model.encode_text(p, i, pooled=True))(model.params, ids)
    d = XL.text.hidden_size
    errs = {"text_encoder": rel_err(ctx[..., :d], out_1.hidden_states[-2].numpy()),  # penultimate, no final LN
            "text_encoder_2": rel_err(ctx[..., d:], out_2.hidden_states[-2].numpy()),
            "pooled": rel_err(pooled, out_2.text_embeds.numpy())}  # final LN'd last layer at EOS @ text_projection
    print("SDXL text encoders vs transformers: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert max(errs.values()) <= TOL
    assert rel_err(ctx[..., :d], out_1.last_hidden_state.numpy()) > 1e-2  # the last layer: a different answer


# ------------------------------------------------------------------------------------------- export, CLI


def test_cli_convert_verify_and_export_round_trip(tiny, tmp_path):
    """convert to a directory, load it, export it back (sgm layout, bit exact), verify the file (all four
    components, weights rows and the VAE included) at 1e-5."""
    sd, path, model = tiny
    rc, out, err = cli("convert", path, tmp_path / "conv")
    assert rc == 0, err
    assert "tiny_xl.safetensors -> " in out and ": sdxl, raw U-Net" in out and "ignored 1: OpenCLIP logit scale" in out
    converted = ldm_jax.load(tmp_path / "conv")
    assert converted.config == XL and set(converted.params) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    for a, b in zip(jax.tree_util.tree_leaves(converted.params), jax.tree_util.tree_leaves(model.params)):
        np.testing.assert_array_equal(a, b)
    rc, _, err = cli("export", tmp_path / "conv", tmp_path / "back.safetensors")
    assert rc == 0, err
    exported = read_state_dict(tmp_path / "back.safetensors")
    assert exported.keys() == sd.keys() - IGNORED
    for k in exported:
        assert exported[k].dtype == sd[k].dtype and np.array_equal(exported[k], sd[k]), k
    rc, out, err = cli("verify", path, "--latent-size", "8x8", "--tolerance", TOL)
    assert rc == 0, out + err
    assert "parity OK" in out and out.count("(all ") == 4 and "pooled (projected EOS)" in out, out
    assert "text_encoder_2  layer 2, no final LN" in out and "eps, t in {0, 999}, with y" in out, out


def test_random_checkpoint_writes_the_sgm_layout(tmp_path):
    out = tmp_path / "xl.safetensors"
    rc, stdout, err = cli("random-checkpoint", "--preset", "tiny-xl", out)
    assert rc == 0, err
    written = read_state_dict(out)
    assert {k for k in written if k.startswith("conditioner.")} == expected_text_keys(XL)
    assert not any(k.startswith("cond_stage_model.") for k in written)
    model = ldm_jax.load(out)
    assert model.config == XL and detect_kind(written) == "sdxl"

