"""kohya-ss SDXL LoRA / LoCon / LyCORIS files merged into SDXL models (`--lora`, `ldm_jax.load(loras=)`):
`convert.lora` on the `tiny-xl` preset (random weights).

kohya's sdxl_train_network.py names U-Net modules by its sgm-named U-Net
(`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`) and the text encoders `lora_te1_` / `lora_te2_` +
transformers CLIPTextModel(WithProjection) paths. Ground truth for the names: diffusers' own kohya converter
(`_maybe_map_sgm_blocks_to_diffusers` with the U-Net's config, then `_convert_non_diffusers_lora_to_diffusers`, as
`StableDiffusionXLLoraLoaderMixin.lora_state_dict` does, and the PEFT renaming `load_lora_adapter` /
`_load_lora_into_text_encoder` apply) sends each module to a diffusers / transformers module, and that module,
loaded through diffusers' own single-file conversions of the same sgm file (`convert.torch_reference`), must
hold the very tensor our table maps the module to (for the second encoder's q/k/v: the rows of in_proj_weight).
The merge is checked against kohya's formula computed in torch (tests/test_lora.py's `_kohya_delta`) and LyCORIS'
LoHa formula, at the right sgm keys, every other tensor bit-identical.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import ldm_jax
from convert import torch_reference
from convert.errors import CheckpointError
from convert.keys import take_part
from convert.lora import check_lora_file
from convert.lora_names import module_table, module_tables, sgm_unet_modules
from convert.mapping import params_to_state_dict
from convert.readers import read_state_dict
from ldm_jax import configs
from ldm_jax.cli.main import main
from ldm_jax.models.build import abstract_params
from tests.cli_run import cli
from tests.parity import assert_merged
from tests.test_lora import _kohya_delta, _write

XL = configs.tiny_xl()
SCALE = 0.7
TE1, TE2 = "lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_"
# kohya module name: (down shape, up shape, alpha); sgm names, every kind kohya's LoRA/LoCon adapts
SGM_LORA = {
    "lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_q": ((4, 64), (64, 4), 2.0),
    "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k": ((4, 96), (64, 4), None),
    "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_out_0": ((2, 64), (64, 2), 1.0),
    "lora_unet_output_blocks_1_1_transformer_blocks_1_ff_net_0_proj": ((4, 64), (512, 4), 8.0),
    "lora_unet_input_blocks_3_1_transformer_blocks_0_ff_net_2": ((4, 256), (64, 4), 4.0),
    "lora_unet_middle_block_1_proj_in": ((4, 64), (64, 4), 2.0),
    "lora_unet_output_blocks_1_1_proj_out": ((4, 64), (64, 4), 2.0),
    "lora_unet_input_blocks_1_0_in_layers_2": ((3, 32, 3, 3), (32, 3, 1, 1), 1.0),  # LoCon 3x3
    "lora_unet_input_blocks_2_0_op": ((2, 32, 3, 3), (32, 2, 1, 1), 4.0),  # downsampler
    "lora_unet_output_blocks_1_2_conv": ((2, 64, 3, 3), (64, 2, 1, 1), 2.0),  # upsampler
    "lora_unet_output_blocks_2_0_skip_connection": ((2, 96, 1, 1), (32, 2, 1, 1), 2.0),  # 1x1 conv
    "lora_unet_output_blocks_3_0_emb_layers_1": ((4, 128), (32, 4), 8.0),
    "lora_unet_label_emb_0_0": ((2, 1568), (128, 2), 1.0),
    "lora_unet_time_embed_0": ((2, 32), (128, 2), 1.0),
    TE1 + "0_self_attn_q_proj": ((2, 64), (64, 2), 1.0),
    TE1 + "1_mlp_fc1": ((4, 64), (128, 4), 4.0),
    TE2 + "2_self_attn_v_proj": ((2, 32), (32, 2), 1.0),  # rows 64:96 of in_proj_weight
    TE2 + "0_self_attn_out_proj": ((4, 32), (32, 4), 2.0),
    TE2 + "1_mlp_fc2": ((4, 64), (32, 4), 2.0),
}
LOHA = TE2 + "1_self_attn_k_proj"  # rows 32:64 of in_proj_weight
FULL = TE2 + "1_self_attn_q_proj"  # diff + diff_b: rows 0:32 of in_proj_weight and in_proj_bias
# diffusers names on the same U-Net (a second file: one file does not mix the namings)
DIFFUSERS_LORA = {
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_v": ((4, 96), (64, 4), 2.0),
    "lora_unet_add_embedding_linear_2": ((2, 128), (128, 2), 1.0),
}


def _r(rng, shape):
    return (0.3 * rng.standard_normal(shape)).astype(np.float32)


def _lora_tensors(rng, spec) -> tuple[dict, dict]:
    """(file tensors, {module: (down, up, alpha)}) of kohya LoRA modules with random values."""
    tensors, modules = {}, {}
    for name, (down, up, alpha) in spec.items():
        modules[name] = (_r(rng, down), _r(rng, up), alpha)
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = modules[name][:2]
        if alpha is not None:
            tensors[f"{name}.alpha"] = np.float32(alpha)
    return tensors, modules


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_xl")
    model = d / "tiny_xl.safetensors"
    assert main(["random-checkpoint", str(model), "--preset", "tiny-xl", "--seed", "3"]) == 0
    rng = np.random.default_rng(1)
    tensors, modules = _lora_tensors(rng, SGM_LORA)
    loha = {"hada_w1_a": _r(rng, (32, 2)), "hada_w1_b": _r(rng, (2, 32)), "hada_w2_a": _r(rng, (32, 2)),
            "hada_w2_b": _r(rng, (2, 32)), "alpha": np.float32(1.0)}
    full = {"diff": _r(rng, (32, 32)), "diff_b": _r(rng, (32,))}
    tensors.update({f"{LOHA}.{k}": v for k, v in loha.items()})
    tensors.update({f"{FULL}.{k}": v for k, v in full.items()})
    other, other_modules = _lora_tensors(rng, DIFFUSERS_LORA)
    return {"model": str(model), "state_dict": read_state_dict(model), "modules": modules, "loha": loha,
            "full": full, "other_modules": other_modules, "lora": _write(d / "xl_style.safetensors", tensors),
            "other": _write(d / "xl_diffusers_names.safetensors", other)}


@pytest.fixture(scope="module")
def refs(files):
    """diffusers' UNet2DConditionModel and transformers' two text models, loaded from the sgm file through diffusers'
    own single-file conversions."""
    built = torch_reference.build(XL, files["state_dict"], components=("unet", "text_encoder", "text_encoder_2"))
    return {"unet": built["unet"].unet, "text_encoder": built["text_encoder"].inner(),
            "text_encoder_2": built["text_encoder_2"].inner()}


def _module(model, path):
    """`model`'s submodule `path` (transformers v5's CLIPTextModel has no text_model level)."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return model.get_submodule(path.removeprefix("text_model."))


def _diffusers_modules_of(names, unet_config) -> dict[str, tuple[str, str]]:
    """{kohya module name: (diffusers component, module path)} by diffusers' kohya-to-PEFT conversion. Each module's
    tensors are tagged with its index, which the converted dict carries to the module's new name."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers, _maybe_map_sgm_blocks_to_diffusers)
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    state_dict = {}
    for i, name in enumerate(names):
        state_dict[f"{name}.lora_down.weight"] = state_dict[f"{name}.lora_up.weight"] = torch.tensor([float(i)])
    state_dict = _maybe_map_sgm_blocks_to_diffusers(state_dict, unet_config)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(state_dict)
    out = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        own = {k[len(component) + 1:]: v for k, v in converted.items() if k.startswith(component + ".")}
        peft = convert_unet_state_dict_to_peft(own) if component == "unet" else convert_state_dict_to_peft(own)
        for key, tag in peft.items():
            if key.endswith(".lora_A.weight"):
                out[names[int(tag)]] = (component, key[:-len(".lora_A.weight")])
    assert len(out) == len(names)
    return out


def _compvis_tensor(files, entry) -> np.ndarray:
    return np.asarray(take_part(entry, files["state_dict"][entry.key]))


def test_sgm_names_go_where_diffusers_kohya_converter_sends_them(files, refs):
    table = module_table(XL)
    names = [n for n in table if not n.startswith("lora_unet_")] + [
        "lora_unet_" + m.replace(".", "_") for m in sgm_unet_modules(abstract_params(XL)["unet"])]
    assert len(names) == 125 + 6 * (XL.text.num_layers + XL.text_2.num_layers)
    assert set(SGM_LORA) <= set(names) and "lora_unet_input_blocks_0_0" in names and "lora_unet_out_2" in names
    targets = _diffusers_modules_of(names, refs["unet"].config)
    for name, (component, path) in targets.items():
        weight = _module(refs[component], path).weight.detach().numpy()
        entry = table[name]
        assert entry.component == component and entry.compvis_shape == tuple(weight.shape), (name, path)
        np.testing.assert_array_equal(_compvis_tensor(files, entry), weight, err_msg=f"{name} -> {path}")
    # every Linear/Conv of diffusers' U-Net is named, once; kohya's text modules (CLIPAttention, CLIPMLP) likewise
    unet_hit = {path for component, path in targets.values() if component == "unet"}
    assert unet_hit == {n for n, m in refs["unet"].named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert len(set(targets.values())) == len(targets) == len({(table[n].key, table[n].part) for n in names})


def test_diffusers_names_of_the_sdxl_unet_map_to_the_tensor_of_that_module(files, refs):
    """SDXL LoRAs named the diffusers way (`lora_unet_down_blocks_1_attentions_0_...`): every Linear/Conv of
    diffusers' U-Net (kohya's classes, as tests/test_lora.py, plus conv_in/out, time_embedding and add_embedding,
    SDXL's label_emb) maps to the CompVis tensor that module holds."""
    table = module_table(XL)
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    linear_or_conv = {n: m for n, m in refs["unet"].named_modules() if isinstance(m, layers)}
    assert len(linear_or_conv) == 125 and "add_embedding.linear_1" in linear_or_conv
    for path, module in linear_or_conv.items():
        entry = table["lora_unet_" + path.replace(".", "_")]
        np.testing.assert_array_equal(_compvis_tensor(files, entry), module.weight.detach().numpy(), err_msg=path)


def _loha_delta(t) -> np.ndarray:
    """LyCORIS functional/loha.py: (w1a @ w1b) * (w2a @ w2b) * alpha / r (tests/test_lycoris.py checks ours
    against it)."""
    r = t["hada_w1_b"].shape[0]
    return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * float(t["alpha"]) / r


def test_merge_changes_exactly_the_adapted_rows_by_kohyas_formula(files):
    base = files["state_dict"]
    sd = ldm_jax.load(files["model"], loras=[(files["lora"], SCALE), (files["other"], -0.4)])
    got = params_to_state_dict(sd.params)
    weights, biases = module_tables(XL)
    changed: dict[str, np.ndarray] = {}

    def add(entry, delta):
        full = changed.setdefault(entry.key, np.zeros(base[entry.key].shape))
        take_part(entry, full)[...] += delta

    for modules, scale in ((files["modules"], SCALE), (files["other_modules"], -0.4)):
        for name, (down, up, alpha) in modules.items():
            add(weights[name], scale * _kohya_delta(down, up, alpha).reshape(weights[name].compvis_shape))
    add(weights[LOHA], SCALE * _loha_delta(files["loha"]))
    add(weights[FULL], SCALE * files["full"]["diff"])
    add(biases[FULL], SCALE * files["full"]["diff_b"])
    assert got.keys() == base.keys() - {"conditioner.embedders.1.model.logit_scale",
                                        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"}
    assert_merged(got, base, changed)
    for key in changed:
        rows = np.abs(changed[key]).reshape(changed[key].shape[0], -1).max(axis=1) > 0
        np.testing.assert_array_equal(got[key][~rows], base[key][~rows], err_msg=key)  # other q/k/v rows untouched
    assert len(changed) == len(SGM_LORA) + len(DIFFUSERS_LORA) + 2  # layer 1's in_proj_weight (q, k) and _bias
    assert sd.metadata["loras"] == [{"name": "xl_style.safetensors", "scale": SCALE},
                                    {"name": "xl_diffusers_names.safetensors", "scale": -0.4}]


def test_cli_txt2img_merges_the_lora_and_names_it(files, tmp_path):
    out = tmp_path / "out"
    rc, _, err = cli("txt2img", "--checkpoint", files["model"], "--prompt", "a red circle", "--steps", 2, "--height",
                     16, "--width", 16, "--seed", 3, "--out", out, "--lora", files["lora"] + ":0.7")
    assert rc == 0, err
    (name,) = os.listdir(out)
    with Image.open(out / name) as im:
        assert im.text["loras"] == "xl_style.safetensors:0.7"


def _q_proj(prefix, width, rows):
    name = f"{prefix}text_model_encoder_layers_0_self_attn_q_proj"
    return {f"{name}.lora_down.weight": np.zeros((2, width)), f"{name}.lora_up.weight": np.zeros((rows, 2))}


def _attn2_to_k(name, width):
    return {f"{name}.lora_down.weight": np.zeros((2, width)), f"{name}.lora_up.weight": np.zeros((640, 2))}


SD1_UNET = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
XL_UNET = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"


@pytest.mark.parametrize("tensors,config,needle", [
    (_q_proj("lora_te_", 768, 768), configs.sdxl(),
     "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight: an SD 1.x LoRA (one text encoder, "
     "lora_te_*) and this model is SDXL (two text encoders, lora_te1_*/lora_te2_*); use a LoRA trained for SDXL"),
    (_attn2_to_k(SD1_UNET, 768), configs.sdxl(),
     f"an SD 1.x LoRA ({SD1_UNET} takes 768-wide text features) and this model is SDXL (2048-wide cross-attention "
     "context); use a LoRA trained for SDXL"),
    (_attn2_to_k(SD1_UNET, 1024), configs.sdxl(), "an SD 2.x LoRA ("),
    ({**_q_proj("lora_te1_", 768, 768), **_q_proj("lora_te2_", 1280, 1280)}, configs.sd1(),
     "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight: an SDXL LoRA (two text encoders, "
     "lora_te1_*/lora_te2_*) and this model is SD 1.x (one text encoder); use a LoRA trained for SD 1.x"),
    (_q_proj("lora_te2_", 1280, 1280), configs.sd2(), "an SDXL LoRA (two text encoders, lora_te1_*/lora_te2_*) and "
                                                      "this model is SD 2.x (one text encoder)"),
    (_attn2_to_k(XL_UNET, 2048), configs.sd1(),
     f"an SDXL LoRA ({XL_UNET} takes 2048-wide text features) and this model is SD 1.x (768-wide cross-attention "
     "context); use a LoRA trained for SD 1.x"),
    (_q_proj("lora_te2_", 1280, 1280), XL,
     "a LoRA for another model: lora_te2_text_model_encoder_layers_0_self_attn_q_proj takes 1280-wide text features, "
     "this model's second text encoder is 32-wide"),
])
def test_a_lora_of_another_family_is_one_line_naming_both(tmp_path, tensors, config, needle):
    path = _write(tmp_path / "other.safetensors", tensors)
    with pytest.raises(CheckpointError) as e:
        check_lora_file(path, config)
    assert needle in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith(f"LoRA file {path}: ")


@pytest.mark.parametrize("tensors,needle", [
    ({**_attn2_to_k(XL_UNET, 96), **_attn2_to_k(SD1_UNET, 96)},
     f"{XL_UNET} and {SD1_UNET}: U-Net modules named both sgm's way"),
    ({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": np.zeros((2, 32)),
      "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": np.zeros((32, 2))},
     "lora_unet_input_blocks_1_1_proj_in: no such module in this model (expected kohya-ss SDXL names: lora_unet_<sgm"),
    ({f"{TE2}0_self_attn_k_proj.lora_down.weight": np.zeros((2, 32)),
      f"{TE2}0_self_attn_k_proj.lora_up.weight": np.zeros((64, 2))},
     "do not fit the model's conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight[32:64] (32, "
     "32)"),
])
def test_bad_sdxl_loras_are_refused_in_one_line(files, tmp_path, tensors, needle):
    path = _write(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(CheckpointError) as e:
        ldm_jax.load(files["model"], loras=[path])
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_cli_convert_bakes_sdxl_loras_and_refuses_an_sd1_lora_in_one_line(files, tmp_path):
    rc, _, err = cli("convert", files["model"], tmp_path / "baked", "--lora", files["lora"] + ":0.7")
    assert rc == 0, err
    baked = ldm_jax.load(tmp_path / "baked")
    merged = ldm_jax.load(files["model"], loras=[(files["lora"], 0.7)])
    for a, b in zip(jax.tree_util.tree_leaves(baked.params), jax.tree_util.tree_leaves(merged.params)):
        np.testing.assert_array_equal(a, b)
    assert [e["name"] for e in baked.metadata["loras"]] == ["xl_style.safetensors"]
    sd1 = _write(tmp_path / "sd1_lora.safetensors", _q_proj("lora_te_", 64, 64))
    rc, _, err = cli("convert", files["model"], tmp_path / "out", "--lora", sd1)
    assert rc == 2 and err.count("\n") == 1 and "an SD 1.x/2.x LoRA (one text encoder, lora_te_*) and this model is " \
                                                "SDXL" in err, err
    assert not (tmp_path / "out").exists()
