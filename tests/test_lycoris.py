"""LyCORIS files (LoHa, LoKr, LoCon with a Tucker core, full diff) merged by `--lora` / `ldm_jax.load(loras=)`:
`convert.lycoris`, dispatched per module by `convert.lora`.

Ground truth: LyCORIS itself (`lycoris-lora` 4.1.3, a test dependency). Each fake file's modules are real LyCORIS
modules (LohaModule, LokrModule, LoConModule) built on torch layers of the target weight's shape, filled with random
values and saved by their own `custom_state_dict`, so the tensor names and layouts are those LyCORIS writes, under
kohya module names. Each merged weight must equal base + scale * the update of LyCORIS' functional API
(`lycoris.functional.{loha,lokr,locon}`) within 1e-6 of the update's size; every other tensor is bit-identical.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
import torch

import ldm_jax
from convert import lycoris
from convert.errors import CheckpointError
from convert.lora import check_lora_file
from convert.lora_names import module_tables
from convert.mapping import params_to_state_dict
from convert.readers import read_state_dict
from convert.safetensors_io import write_safetensors
from ldm_jax.cli.main import main
from lycoris.functional import locon as ly_locon, loha as ly_loha, lokr as ly_lokr
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from tests.parity import assert_merged
from tests.test_lora import TINY, _txt2img, _write, cli

SCALE = 0.7
TE = "lora_te_text_model_encoder_layers_"
# kohya module name (without lora_unet_ for the U-Net): (LyCORIS module, its arguments, the tensors it must save)
SPECS = {
    "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":  # Linear
        (LohaModule, dict(lora_dim=4, alpha=2.0), {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}),
    "down_blocks_0_resnets_0_conv1":  # 3x3 conv, hada_w?_b [r, in*9]
        (LohaModule, dict(lora_dim=3, alpha=1.0), {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}),
    "up_blocks_0_upsamplers_0_conv":  # 3x3 conv, Tucker
        (LohaModule, dict(lora_dim=2, alpha=4.0, use_tucker=True),
         {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"}),
    "mid_block_attentions_0_proj_in":  # 1x1 conv
        (LohaModule, dict(lora_dim=2, alpha=1.0), {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}),
    TE + "1_self_attn_q_proj":  # no alpha in the file (alpha = rank), stored in bfloat16
        (LohaModule, dict(lora_dim=2, alpha=None), {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
    "down_blocks_0_resnets_0_time_emb_proj":  # Linear [32, 128]: full w1, factorised w2
        (LokrModule, dict(lora_dim=2, alpha=1.0), {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}),
    TE + "0_mlp_fc1":  # both halves factorised
        (LokrModule, dict(lora_dim=2, alpha=3.0, decompose_both=True),
         {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "alpha"}),
    "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k":  # both full: the file's alpha (5) is not used
        (LokrModule, dict(lora_dim=2, alpha=1.0, full_matrix=True), {"lokr_w1", "lokr_w2", "alpha"}),
    "down_blocks_0_downsamplers_0_conv":  # 3x3 conv, lokr_w2_b [r, d*9]
        (LokrModule, dict(lora_dim=2, alpha=1.0), {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}),
    "up_blocks_1_resnets_0_conv1":  # 3x3 conv [32, 96], Tucker
        (LokrModule, dict(lora_dim=2, alpha=2.0, use_tucker=True),
         {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"}),
    "conv_in":  # 3x3 conv, full w2 [b, d, 3, 3]
        (LokrModule, dict(lora_dim=2, alpha=1.0, full_matrix=True), {"lokr_w1", "lokr_w2", "alpha"}),
    "up_blocks_0_attentions_0_proj_out":  # 1x1 conv, factor 4
        (LokrModule, dict(lora_dim=2, alpha=1.0, factor=4), {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}),
    "up_blocks_1_resnets_1_conv2":  # LoCon with a Tucker core
        (LoConModule, dict(lora_dim=2, alpha=1.0, use_tucker=True),
         {"lora_down.weight", "lora_mid.weight", "lora_up.weight", "alpha"}),
    "up_blocks_1_resnets_1_time_emb_proj":  # a plain LoRA module in the same file (the kohya path)
        (LoConModule, dict(lora_dim=4, alpha=2.0), {"lora_down.weight", "lora_up.weight", "alpha"}),
    "down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2": (None, {}, {"diff", "diff_b"}),  # full, with bias
    "conv_out": (None, {}, {"diff"}),  # full, 3x3 conv, no bias update
}
KINDS = {"LoRA", lycoris.TUCKER_LOCON, "LoHa", "LoKr", "full"}


def _name(short):
    return short if short.startswith("lora_te_") else "lora_unet_" + short


def _layer(shape):
    out, inn, *k = shape
    return torch.nn.Conv2d(inn, out, tuple(k)) if k else torch.nn.Linear(inn, out)


def _reference(module, tensors, alpha, target) -> np.ndarray:
    """The update (no user scale) by LyCORIS' functional API, from the tensors as written to the file."""
    t = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in tensors.items()}
    if module is None:
        return t["diff"].numpy().reshape(target)
    if isinstance(module, LohaModule):
        d = ly_loha.diff_weight(t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], t.get("hada_t1"),
                                t.get("hada_t2"), gamma=module.scale, backend="torch")
    elif isinstance(module, LokrModule):
        w = [t.get(k) for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")]
        if w[-1] is None:  # LyCORIS finds the rank (and that there is none) itself: gamma is the file's alpha
            d = ly_lokr.diff_weight(*w, gamma=alpha, backend="torch")
        else:  # its rank_scale reads the Tucker lokr_w2_a [r, b] as [b, r]; the module's scale is alpha / r
            d = ly_lokr.kron_weight(*w, scale=module.scale, backend="torch")
    else:
        d = ly_locon.diff_weight(t["lora_down.weight"], t["lora_up.weight"], t.get("lora_mid.weight"),
                                 gamma=module.scale, backend="torch")
    return d.detach().numpy().reshape(target)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lycoris")
    model = d / "tiny.safetensors"
    assert main(["random-checkpoint", str(model), "--preset", "tiny", "--seed", "3"]) == 0
    weights, _ = module_tables(TINY)
    torch.manual_seed(0)
    tensors, expected = {}, {}
    for short, (cls, kwargs, saved) in SPECS.items():
        name, entry = _name(short), weights[_name(short)]
        target = entry.compvis_shape
        if cls is None:
            part = {"diff": 0.3 * torch.randn(target)}
            if "diff_b" in saved:
                part["diff_b"] = 0.3 * torch.randn(target[0])
            module = None
        else:
            module = cls(name, _layer(target), 1.0, **kwargs)
            with torch.no_grad():
                for p in module.parameters():
                    p.normal_(0.0, 0.5)
            part = dict(module.custom_state_dict())
        part = {k: v.detach().numpy().astype(np.float32) for k, v in part.items()}
        if "alpha" not in saved:
            part.pop("alpha", None)
        if short.endswith("attn1_to_k"):
            part["alpha"] = np.float32(5.0)
        if short.startswith(TE + "1_"):
            part = {k: v.astype(ml_dtypes.bfloat16) for k, v in part.items()}
        assert set(part) == saved, (short, sorted(part))  # LyCORIS saves this layout
        alpha = float(part["alpha"]) if "alpha" in part else None
        expected[name] = (entry, part.get("diff_b"), _reference(module, part, alpha, target))
        tensors.update({f"{name}.{k}": v for k, v in part.items()})
    write_safetensors(d / "lycoris.safetensors", tensors)
    return {"dir": d, "model": str(model), "lora": str(d / "lycoris.safetensors"), "expected": expected}


def test_the_file_has_every_kind_and_passes_the_checks(files):
    modules = check_lora_file(files["lora"], TINY)
    assert {lycoris.module_kind(parts) for parts in modules.values()} == KINDS
    assert set(modules) == set(files["expected"])


@pytest.mark.parametrize("cls,kwargs", [(LohaModule, {}), (LokrModule, {}), (LokrModule, dict(decompose_both=True)),
                                        (LokrModule, dict(full_matrix=True)), (LoConModule, dict(use_tucker=True))])
@pytest.mark.parametrize("alpha", [None, 0.0, 1.0, 6.0])
def test_alpha_factor_is_lycoris_modules_scale(cls, kwargs, alpha):
    module = cls("x", torch.nn.Conv2d(32, 32, 3), 1.0, lora_dim=2, alpha=alpha, **kwargs)
    saved = {k: v.detach().numpy() for k, v in module.custom_state_dict().items()}  # alpha as saved (r when 0/None)
    rank = lycoris.rank_of(lycoris.module_kind(saved), saved, (32, 32, 3, 3))
    assert lycoris.alpha_factor(alpha, rank) == lycoris.alpha_factor(float(saved["alpha"]), rank) == module.scale


def test_merge_equals_lycoris_own_updates(files):
    base = read_state_dict(files["model"])
    sd = ldm_jax.load(files["model"], loras=[(files["lora"], SCALE)])
    got = params_to_state_dict(sd.params)
    assert got.keys() == base.keys()
    changed = {}
    for entry, diff_b, reference in files["expected"].values():
        changed[entry.key] = SCALE * reference.astype(np.float64)
        if diff_b is not None:
            changed[entry.key[:-len("weight")] + "bias"] = SCALE * np.asarray(diff_b, np.float64)
    assert_merged(got, base, changed)
    for key in changed:
        assert np.abs(changed[key]).max() > 1e-2 and not np.array_equal(got[key], base[key]), key
    assert len(changed) == len(SPECS) + 1  # every module's weight and the one diff_b
    assert sd.metadata["loras"] == [{"name": "lycoris.safetensors", "scale": SCALE}]


def test_cli_lycoris_changes_the_image_and_scale_0_is_the_plain_model(files, tmp_path):
    plain, text = _txt2img(files, tmp_path / "plain")
    styled, text = _txt2img(files, tmp_path / "styled", "--lora", files["lora"] + ":2")
    assert text["loras"] == "lycoris.safetensors:2"
    assert np.abs(styled - plain).max() > 8
    zero, _ = _txt2img(files, tmp_path / "zero", "--lora", files["lora"] + ":0")
    np.testing.assert_array_equal(zero, plain)


Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
Q_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"


def _z(*shape):
    return np.zeros(shape, np.float32)


def _loha(name, r=4, out=32, inn=32):
    return {f"{name}.hada_w1_a": _z(out, r), f"{name}.hada_w1_b": _z(r, inn), f"{name}.hada_w2_a": _z(out, r),
            f"{name}.hada_w2_b": _z(r, inn), f"{name}.alpha": _z()}


@pytest.mark.parametrize("tensors,needle", [
    (_loha(Q, out=64), f"{Q}: LoHa tensors hada_w1_a (64, 4), hada_w1_b (4, 32), hada_w2_a (64, 4), hada_w2_b "
                       f"(4, 32) do not fit the model's {Q_KEY}.weight (32, 32): expected hada_w?_a [32, r], hada_w?_b "
                       "[r, 32]"),
    ({f"{Q}.lokr_w1": _z(4, 4), f"{Q}.lokr_w2": _z(4, 4)},
     f"{Q}: LoKr tensors lokr_w1 (4, 4), lokr_w2 (4, 4) do not fit the model's {Q_KEY}.weight (32, 32): expected "
     "kron("),
    ({f"{CONV}.lora_down.weight": _z(2, 32, 1, 1), f"{CONV}.lora_mid.weight": _z(2, 2, 1, 1),
      f"{CONV}.lora_up.weight": _z(32, 2, 1, 1)},
     f"{CONV}: LoCon (Tucker) tensors lora_down.weight (2, 32, 1, 1), lora_mid.weight (2, 2, 1, 1), lora_up.weight "
     "(32, 2, 1, 1) do not fit the model's model.diffusion_model.input_blocks.1.0.in_layers.2.weight (32, 32, 3, 3)"),
    ({f"{Q}.diff": _z(32, 32), f"{Q}.diff_b": _z(32)},
     f"{Q}.diff_b (32,) does not fit: the model's {Q_KEY} has no bias"),
    ({f"{Q}.diff": _z(32, 32, 3, 3)}, f"{Q}: full tensors diff (32, 32, 3, 3) do not fit the model's {Q_KEY}.weight"),
    ({f"{Q}.hada_w3_a": _z(32, 4)}, f"{Q}.hada_w3_a: not a kohya-ss LoRA or LyCORIS tensor (expected lora_unet_*/"),
    ({**_loha(Q), f"{Q}.lora_down.weight": _z(4, 32)},
     f"{Q}: mixes tensors of different kinds in one module (LoHa .hada_w1_a, LoHa .hada_w1_b"),
    ({**_loha(Q), f"{Q}.dora_scale": _z(32, 1)}, f"{Q}.dora_scale: a DoRA magnitude (dora_scale)"),
    ({**_loha(Q), f"{Q}.hada_t1": _z(4, 4, 3, 3)}, f"{Q}: has .hada_t1 without .hada_t2"),
    ({f"{Q}.lokr_w1": _z(4, 4), f"{Q}.lokr_w1_a": _z(4, 2), f"{Q}.lokr_w1_b": _z(2, 4), f"{Q}.lokr_w2": _z(8, 8)},
     f"{Q}: has both .lokr_w1 and .lokr_w1_a/.lokr_w1_b"),
    ({f"{Q}.lokr_w1": _z(4, 4)}, f"{Q}: has no .lokr_w2 (or .lokr_w2_a and .lokr_w2_b)"),
    ({f"{Q}.alpha": _z()}, f"{Q}: has an .alpha but no weights"),
    ({f"{Q}.on_input": _z(32)}, f"{Q}.on_input: a LyCORIS (IA)^3 tensor; not supported"),
])
def test_bad_lycoris_files_are_refused_in_one_line_naming_the_key(files, tmp_path, tensors, needle):
    path = _write(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(CheckpointError) as e:
        ldm_jax.load(files["model"], loras=[(path, 1.0)])
    assert needle in str(e.value) and "\n" not in str(e.value) and f"LoRA file {path}: " in str(e.value), str(e.value)


def test_cli_bad_lycoris_file_fails_in_one_line_before_loading(files, tmp_path, monkeypatch):
    def slow_work(*_, **__):
        raise AssertionError("the model was loaded or compiled before the LoRA file was checked")

    monkeypatch.setattr("ldm_jax.warm_start.load_while_compiling", slow_work)
    monkeypatch.setattr("ldm_jax.load", slow_work)
    path = _write(tmp_path / "bad.safetensors", _loha(Q, r=2, inn=64))
    out = tmp_path / "out"
    rc, _, err = cli("txt2img", "--checkpoint", files["model"], "--lora", path, "--prompt", "x", "--out", out)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"{Q}: LoHa tensors hada_w1_a (32, 2), hada_w1_b (2, 64)" in err and not os.path.exists(out), err
