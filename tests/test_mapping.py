"""The key table and the strict CompVis <-> Flax mapping (no torch needed)."""

import jax
import numpy as np
import pytest

from convert.detect import detect_kind, infer_config
from convert.errors import CheckpointError
from convert.keys import key_table
from convert.mapping import _ordered_map, params_to_state_dict, state_dict_to_params
from ldm_jax import configs
from ldm_jax.models.build import abstract_params

SD1 = abstract_params(configs.sd1())
TINY = abstract_params(configs.tiny())


def fake_state_dict(shapes, seed=0, dtype=np.float32):
    """Random CompVis-layout tensors with exactly the shapes the table expects."""
    rng = np.random.default_rng(seed)
    return {e.key: rng.standard_normal(e.compvis_shape).astype(dtype)
            for c in shapes for e in key_table(c, shapes[c])}


def shapes_only(shapes):
    """Zero-cost stand-ins (broadcast views) with the full-size shapes, for shape-only checks."""
    return {e.key: np.broadcast_to(np.float32(0), e.compvis_shape) for c in shapes for e in key_table(c, shapes[c])}


def test_sd1_table_has_the_compvis_names_and_counts():
    keys = {c: {e.key for e in key_table(c, SD1[c])} for c in SD1}
    assert len(keys["unet"]) == 686 and len(keys["vae"]) == 248 and len(keys["text_encoder"]) == 196
    for k in ["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
              "model.diffusion_model.input_blocks.3.0.op.weight",
              "model.diffusion_model.output_blocks.2.1.conv.weight",  # upsampler index 1 (no attention level 3)
              "model.diffusion_model.output_blocks.5.2.conv.weight",  # index 2 after a SpatialTransformer
              "model.diffusion_model.middle_block.1.proj_in.weight",
              "model.diffusion_model.time_embed.2.bias", "model.diffusion_model.out.0.weight"]:
        assert k in keys["unet"], k
    for k in ["first_stage_model.encoder.mid.block_1.norm1.weight", "first_stage_model.encoder.mid.attn_1.q.weight",
              "first_stage_model.decoder.up.3.upsample.conv.weight",
              "first_stage_model.encoder.down.0.downsample.conv.bias",
              "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight", "first_stage_model.quant_conv.weight"]:
        assert k in keys["vae"], k
    assert "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight" in keys["text_encoder"]
    n = sum(int(np.prod(e.flax_shape)) for c in SD1 for e in key_table(c, SD1[c]))
    assert n == 859_520_964 + 83_653_863 + 123_060_480  # U-Net, VAE, CLIP-L text parameters


def test_round_trip_is_bit_exact():
    sd = fake_state_dict(TINY)
    params, report = state_dict_to_params(sd, TINY)
    assert len(report.mapped) == len(sd) and not report.ignored and not report.unexpected
    back = params_to_state_dict(params)
    assert back.keys() == sd.keys()
    for k in sd:
        assert back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k]), k


def test_layout_rules():
    sd = fake_state_dict(TINY)
    params, _ = state_dict_to_params(sd, TINY)
    w = sd["model.diffusion_model.input_blocks.0.0.weight"]  # OIHW
    np.testing.assert_array_equal(params["unet"]["input_blocks_0_0"]["kernel"], w.transpose(2, 3, 1, 0))
    w = sd["model.diffusion_model.time_embed.0.weight"]  # [out, in]
    np.testing.assert_array_equal(params["unet"]["time_embed_0"]["kernel"], w.T)
    w = sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    np.testing.assert_array_equal(params["text_encoder"]["embeddings"]["token_embedding"]["embedding"], w)


def test_parallel_conversion_matches_one_thread_and_fails_on_the_first_bad_tensor_in_table_order():
    sd = fake_state_dict(TINY, dtype=np.float16)
    serial, _ = state_dict_to_params(sd, TINY, workers=1)
    parallel, _ = state_dict_to_params(sd, TINY, workers=4, place=np.array)
    for a, b in zip(jax.tree_util.tree_leaves(serial), jax.tree_util.tree_leaves(parallel)):
        assert a.dtype == b.dtype == np.float32 and a.flags.c_contiguous and np.array_equal(a, b)
    keys = [e.key for c in TINY for e in key_table(c, TINY[c])]
    for k in (keys[5], keys[-3]):  # an earlier bad tensor wins even when later ones fail too
        sd[k] = np.full(sd[k].shape, np.inf, np.float16)
    with pytest.raises(CheckpointError, match=rf"^{keys[5]}: contains NaN or Inf"):
        state_dict_to_params(sd, TINY, workers=4)


def test_ordered_map_keeps_order_and_bounds_its_lookahead():
    started, consumed = [], []

    def work(i):
        started.append(i)
        return i * i

    for i, sq in enumerate(_ordered_map(work, range(50), workers=3)):
        assert sq == i * i and max(started) <= i + 2 * 3 - 1  # at most 2 * workers items ahead of the consumer
        consumed.append(i)
    assert consumed == list(range(50))


def test_missing_key_is_named():
    sd = fake_state_dict(TINY)
    del sd["first_stage_model.decoder.mid.attn_1.v.bias"]
    with pytest.raises(CheckpointError, match=r"first_stage_model\.decoder\.mid\.attn_1\.v\.bias"):
        state_dict_to_params(sd, TINY)


def test_wrong_shape_is_named():
    sd = fake_state_dict(TINY)
    sd["model.diffusion_model.out.2.weight"] = np.zeros((4, 32, 3, 2), np.float32)
    with pytest.raises(CheckpointError, match=r"model\.diffusion_model\.out\.2\.weight: shape"):
        state_dict_to_params(sd, TINY)


def test_non_tensor_and_nonfinite_and_integer_values():
    sd = fake_state_dict(TINY)
    sd["model.diffusion_model.out.2.bias"] = "not a tensor"
    with pytest.raises(CheckpointError, match=r"out\.2\.bias: expected a tensor"):
        state_dict_to_params(sd, TINY)
    sd = fake_state_dict(TINY)
    sd["model.diffusion_model.out.2.bias"][1] = np.nan
    with pytest.raises(CheckpointError, match=r"out\.2\.bias: contains NaN"):
        state_dict_to_params(sd, TINY)
    params, _ = state_dict_to_params(sd, TINY, allow_nonfinite=True)
    assert np.isnan(params["unet"]["out_2"]["bias"][1])
    sd = fake_state_dict(TINY)
    sd["model.diffusion_model.out.2.bias"] = np.zeros(4, np.int64)
    with pytest.raises(CheckpointError, match="floating-point"):
        state_dict_to_params(sd, TINY)


def test_ignored_and_unexpected():
    sd = fake_state_dict(TINY)
    sd["betas"] = np.zeros(1000, np.float32)
    sd["alphas_cumprod"] = np.zeros(1000, np.float32)
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(77, dtype=np.float32)[None]
    sd["first_stage_model.loss.logvar"] = np.zeros((), np.float32)
    _, report = state_dict_to_params(sd, TINY)
    assert set(report.ignored) == {"betas", "alphas_cumprod", "first_stage_model.loss.logvar",
                                   "cond_stage_model.transformer.text_model.embeddings.position_ids"}
    sd["model.diffusion_model.extra_thing.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError, match="unexpected.*extra_thing"):
        state_dict_to_params(sd, TINY)
    _, report = state_dict_to_params(sd, TINY, allow_unexpected=True)
    assert report.unexpected == ["model.diffusion_model.extra_thing.weight"]


def test_old_clip_layout_without_text_model():
    sd = fake_state_dict(TINY)
    p = "cond_stage_model.transformer."
    old = {(p + k[len(p + "text_model."):] if k.startswith(p + "text_model.") else k): v for k, v in sd.items()}
    assert not any(k.startswith(p + "text_model.") for k in old)
    a, _ = state_dict_to_params(sd, TINY)
    b, _ = state_dict_to_params(old, TINY)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_ema_weights_are_used_by_default_and_named_forward():
    sd = fake_state_dict(TINY)
    ema = {}
    for e in key_table("unet", TINY["unet"]):
        ema[e.ema_key] = sd[e.key] + 1.0
    assert "model_ema.diffusion_modelinput_blocks00weight" in ema
    sd.update(ema, **{"model_ema.decay": np.float32(0.9999), "model_ema.num_updates": np.int64(10)})
    params, report = state_dict_to_params(sd, TINY)
    assert report.used_ema
    np.testing.assert_array_equal(params["unet"]["out_2"]["bias"], sd["model.diffusion_model.out.2.bias"] + 1)
    raw, report = state_dict_to_params(sd, TINY, ema=False)
    assert not report.used_ema and report.ignored["model_ema.diffusion_modelout2bias"].startswith("EMA weights not")
    np.testing.assert_array_equal(raw["unet"]["out_2"]["bias"], sd["model.diffusion_model.out.2.bias"])
    del sd["model_ema.diffusion_modelout2bias"]
    with pytest.raises(CheckpointError, match=r"model_ema\.diffusion_modelout2bias"):
        state_dict_to_params(sd, TINY)


def test_infer_sd1_config_from_shapes():
    sd = shapes_only(SD1)
    assert detect_kind(sd) == "sd1"
    cfg = infer_config(sd)
    assert cfg.unet == configs.sd1().unet and cfg.vae == configs.sd1().vae and cfg.text == configs.sd1().text
    inpaint = abstract_params(configs.sd1_inpaint(), components=("unet",))
    sd.update(shapes_only(inpaint))
    assert infer_config(sd).unet == configs.sd1_inpaint().unet


@pytest.mark.parametrize("extra,kind", [
    ({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,)},
     "this file holds text encoders of two layouts"),
    ({"cond_stage_model.model.ln_final.weight": (1024,)}, "two text encoders"),  # SD 1.x's and SD 2.x's
    ({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)},
     "incomplete SD 2.x checkpoint"),
])
def test_other_kinds_are_refused_by_name(extra, kind):
    sd = shapes_only(SD1)
    sd.update({k: np.broadcast_to(np.float32(0), s) for k, s in extra.items()})
    with pytest.raises(CheckpointError, match=kind):
        detect_kind(sd)


def test_unrecognised_state_dict():
    with pytest.raises(CheckpointError, match="not a Stable Diffusion checkpoint"):
        detect_kind({"fc.weight": np.zeros((2, 2), np.float32)})


def test_fp16_overflow_is_named_with_its_max_and_no_numpy_warning(recwarn):
    key = "model.diffusion_model.out.2.bias"
    sd = fake_state_dict(TINY)
    sd[key][1] = -1e6  # finite in fp32, Inf in fp16
    with pytest.raises(CheckpointError, match=r"out\.2\.bias: max \|value\| 1e\+06 does not fit float16"):
        state_dict_to_params(sd, TINY, dtype=np.float16)
    with pytest.raises(CheckpointError, match="does not fit float16"):  # an overflow is not a NaN/Inf in the file
        state_dict_to_params(sd, TINY, dtype=np.float16, allow_nonfinite=True)
    params, _ = state_dict_to_params(sd, TINY)  # fp32 holds it
    with pytest.raises(CheckpointError, match=r"out\.2\.bias: max \|value\| 1e\+06 does not fit float16"):
        params_to_state_dict(params, dtype=np.float16)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    import ml_dtypes

    assert params_to_state_dict(params, dtype=ml_dtypes.bfloat16)[key][1] == -999424  # bf16 has the range
    sd[key][1] = np.inf  # a non-finite value already in fp32 passes through an fp16 export unchanged
    params, _ = state_dict_to_params(sd, TINY, allow_nonfinite=True)
    assert np.isinf(params_to_state_dict(params, dtype=np.float16)[key][1])


def test_error_hints_name_flag_and_keyword_not_just_a_cli_flag():
    """The same messages reach `ldm_jax.load`, `verify` and `txt2img`, which have no --allow-*/--ema flags."""
    sd = fake_state_dict(TINY)
    sd["model.diffusion_model.out.2.bias"][1] = np.nan
    with pytest.raises(CheckpointError, match=r"`ldm-jax convert --allow-nonfinite`, or allow_nonfinite=True"):
        state_dict_to_params(sd, TINY)
    sd = fake_state_dict(TINY)
    sd["model.diffusion_model.extra_thing.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError, match=r"`ldm-jax convert --allow-unexpected`, or allow_unexpected=True"):
        state_dict_to_params(sd, TINY)
    with pytest.raises(CheckpointError, match=r"^EMA weights were asked for \(--ema / ema=True\)"):
        state_dict_to_params(fake_state_dict(TINY), TINY, ema=True)
