"""More wrong kinds of file passed where a full SD 1.x CompVis checkpoint is expected (T2I-Adapters, IP-Adapters,
image upscalers, CLIP image encoders, AnimateDiff motion modules, SD3 / Flux / other model families, the SD x4
upscaler, SDXL, rinongal-era embeddings): one line naming the kind and what ldm-jax supports instead, and a
non-zero exit. Fakes use the real key names of each layout (sources in `convert/file_kinds.py`); real SD 1.x key
sets (full-size names from the key table, with EMA, schedule buffers, the old CLIP layout) are never mistaken for
another kind, and a tiny SD 1.x .ckpt with Lightning callbacks and EMA still converts and loads."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

import ldm_jax
from convert.detect import detect_kind
from convert.errors import CheckpointError
from convert.file_kinds import describe
from convert.keys import key_table
from convert.mapping import normalise_keys
from ldm_jax import configs
from ldm_jax.models.build import abstract_params
from tests.test_convert import assert_failed, cli, save_ckpt, save_safetensors, tiny_state_dict
from tests.test_convert_bad_input import _Payload
from tests.test_readers import run_python
from tests.test_wrong_kind import _pt, _st, _t, convert_fails_naming

U = "model.diffusion_model."
BASE = "pass the base Stable Diffusion checkpoint (e.g. v1-5-pruned-emaonly.safetensors)"
SD1 = "ldm-jax supports Stable Diffusion 1.x and 2.x checkpoints (e.g. v1-5-pruned-emaonly.safetensors"
T2I = ["is a T2I-Adapter (", "T2I-Adapters are not supported: " + BASE]
IP = ["is an IP-Adapter (", "IP-Adapters are not supported: " + BASE]
UPSCALER = "image upscalers are not supported: " + SD1


def _torch(tensors):
    return {k: torch.from_numpy(v) for k, v in tensors.items()}


# TencentARC ldm/modules/encoders/adapter.py: Adapter (conv_in, body.N.{block1,block2,in_conv,skep,down_opt})
T2I_FULL = {"conv_in.weight": _t(8, 64, 3, 3), "body.0.block1.weight": _t(8, 8, 3, 3),
            "body.0.block2.weight": _t(8, 8, 1, 1), "body.2.in_conv.weight": _t(16, 8, 1, 1)}
T2I_LIGHT = {"body.0.in_conv.weight": _t(2, 192, 1, 1), "body.0.body.0.block1.weight": _t(2, 2, 3, 3),
             "body.0.out_conv.weight": _t(8, 2, 1, 1)}  # Adapter_light / extractor
T2I_STYLE = {"style_embedding": _t(1, 8, 16), "transformer_layes.0.attn.in_proj_weight": _t(48, 16),
             "ln_pre.weight": _t(16), "ln_post.weight": _t(16), "proj": _t(16, 8)}  # StyleAdapter
COADAPTER_FUSER = {"task_embedding": _t(16, 8), "positional_embedding": _t(4, 8),
                   "spatial_feat_mapping.0.1.weight": _t(8, 8), "seq_proj": _t(8, 8)}  # CoAdapterFuser
T2I_DIFFUSERS = {"adapter.conv_in.weight": _t(8, 192, 3, 3),  # diffusers models/adapter.py T2IAdapter
                 "adapter.body.0.resnets.0.block1.weight": _t(8, 8, 3, 3),
                 "adapter.body.1.in_conv.weight": _t(16, 8, 1, 1)}
# IP-Adapter (h94/IP-Adapter ip-adapter_sd15.bin, ip-adapter-plus, FaceID with its LoRA layers)
IP_PROJ = {"proj.weight": _t(16, 8), "proj.bias": _t(16), "norm.weight": _t(4), "norm.bias": _t(4)}
IP_LAYERS = {"1.to_k_ip.weight": _t(4, 8), "1.to_v_ip.weight": _t(4, 8), "3.to_k_ip.weight": _t(4, 8)}
IP_PLUS = {"image_proj.latents": _t(1, 16, 8), "image_proj.proj_in.weight": _t(8, 8),
           "image_proj.layers.0.0.norm1.weight": _t(8), "ip_adapter.1.to_k_ip.weight": _t(4, 8)}
IP_FACEID = {"image_proj.proj.0.weight": _t(8, 8), "ip_adapter.1.to_k_ip.weight": _t(4, 8),
             "ip_adapter.1.to_q_lora.down.weight": _t(4, 8), "ip_adapter.1.to_q_lora.up.weight": _t(8, 4)}
# upscalers (spandrel architectures/*/__init__.py detection keys)
ESRGAN_OLD = {"model.0.weight": _t(4, 3, 3, 3), "model.1.sub.0.RDB1.conv1.0.weight": _t(4, 4, 3, 3),
              "model.1.sub.1.weight": _t(4, 4, 3, 3), "model.3.weight": _t(4, 4, 3, 3),
              "model.6.weight": _t(3, 4, 3, 3)}
REAL_ESRGAN = {"conv_first.weight": _t(4, 3, 3, 3), "body.0.rdb1.conv1.weight": _t(4, 4, 3, 3),
               "conv_body.weight": _t(4, 4, 3, 3), "conv_up1.weight": _t(4, 4, 3, 3), "conv_hr.weight": _t(4, 4, 3, 3),
               "conv_last.weight": _t(3, 4, 3, 3)}
BSRGAN = {"conv_first.weight": _t(4, 3, 3, 3), "RRDB_trunk.0.RDB1.conv1.weight": _t(4, 4, 3, 3),
          "trunk_conv.weight": _t(4, 4, 3, 3), "conv_last.weight": _t(3, 4, 3, 3)}
COMPACT = {"body.0.weight": _t(4, 3, 3, 3), "body.0.bias": _t(4), "body.1.weight": _t(4),
           "body.2.weight": _t(48, 4, 3, 3), "body.2.bias": _t(48)}  # SRVGGNetCompact (body.1 is a PReLU)
SWINIR = {"conv_first.weight": _t(8, 3, 3, 3), "patch_embed.norm.weight": _t(8),
          "layers.0.residual_group.blocks.0.norm1.weight": _t(8),
          "layers.0.residual_group.blocks.0.attn.relative_position_index": _t(64, 64),
          "layers.0.residual_group.blocks.0.mlp.fc1.bias": _t(16), "conv_after_body.weight": _t(8, 8, 3, 3),
          "upsample.0.weight": _t(32, 8, 3, 3), "conv_last.weight": _t(3, 8, 3, 3)}
# CLIP image encoders (ComfyUI comfy/clip_vision.py; transformers CLIPVisionModelWithProjection; OpenCLIP)
CLIP_VISION = {"vision_model.embeddings.patch_embedding.weight": _t(8, 3, 2, 2),
               "vision_model.encoder.layers.0.layer_norm1.weight": _t(8), "vision_model.post_layernorm.weight": _t(8),
               "visual_projection.weight": _t(4, 8)}
OPENCLIP_VISUAL = {"visual.conv1.weight": _t(8, 3, 2, 2), "visual.class_embedding": _t(8),
                   "visual.transformer.resblocks.0.attn.in_proj_weight": _t(24, 8), "visual.ln_post.weight": _t(8),
                   "visual.proj": _t(8, 4)}
OPENCLIP_FULL = {**OPENCLIP_VISUAL, "token_embedding.weight": _t(10, 8), "positional_embedding": _t(7, 8),
                 "transformer.resblocks.0.attn.in_proj_weight": _t(24, 8), "ln_final.weight": _t(8),
                 "text_projection": _t(8, 4), "logit_scale": _t()}
CLIP_FULL = {"text_model.embeddings.token_embedding.weight": _t(10, 8), **CLIP_VISION, "logit_scale": _t()}
MOTION_MODULE = {  # AnimateDiff mm_sd_v15_v2.ckpt (diffusers single_file_utils "animatediff", "animatediff_v2")
    "down_blocks.0.motion_modules.0.temporal_transformer.norm.weight": _t(8),
    "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe":
        _t(1, 24, 8),
    "mid_block.motion_modules.0.temporal_transformer.norm.bias": _t(8)}
# other model families (diffusers single_file_utils CHECKPOINT_KEY_NAMES, ComfyUI comfy/model_detection.py)
SD3 = {U + "joint_blocks.0.context_block.attn.qkv.weight": _t(24, 8),
       U + "joint_blocks.0.context_block.adaLN_modulation.1.bias": _t(48),
       U + "x_embedder.proj.weight": _t(8, 16, 2, 2),
       "first_stage_model.encoder.conv_in.weight": _t(8, 3, 3, 3),
       "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight": _t(77, 8)}
FLUX = {"double_blocks.0.img_attn.norm.key_norm.scale": _t(8), "double_blocks.0.img_attn.qkv.weight": _t(24, 8),
        "single_blocks.0.linear1.weight": _t(24, 8), "img_in.weight": _t(8, 64), "txt_in.weight": _t(8, 16),
        "time_in.in_layer.weight": _t(8, 4)}
PIXART = {"x_embedder.proj.weight": _t(8, 4, 2, 2), "t_embedder.mlp.0.weight": _t(8, 4), "t_block.1.weight": _t(48, 8),
          "y_embedder.y_proj.fc1.weight": _t(8, 16), "blocks.0.attn.qkv.weight": _t(24, 8),
          "blocks.0.cross_attn.q_linear.weight": _t(8, 8)}


def _sd1(**changes):
    sd = tiny_state_dict()
    sd.update({k: v for k, v in changes.items() if v is not None})
    return {k: v for k, v in sd.items() if changes.get(k, 0) is not None}


def _x4_upscaler(d):
    """Stability-AI x4-upscaler-ema: 7-channel U-Net with a noise-level embedding, low_scale_model buffers, OpenCLIP."""
    sd = _sd1(**{U + "input_blocks.0.0.weight": _t(32, 7, 3, 3), U + "label_emb.weight": _t(1000, 128),
                 "low_scale_model.betas": _t(350), "low_scale_model.alphas_cumprod": _t(350),
                 "cond_stage_model.model.ln_final.weight": _t(8)})
    return save_safetensors(d / "x4-upscaler-ema.safetensors", sd, None)


def _rinongal_embedding(d):
    """rinongal/textual_inversion embeddings.pt: string_to_param is a torch.nn.ParameterDict."""
    return _pt(d, "embeddings.pt", {"string_to_token": {"*": torch.tensor(265)},
                                    "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(
                                        torch.zeros(1, 768))})})


# name -> (make(dir) -> path, needles the one error line must contain)
CASES = {
    "T2I-Adapter .pth": (lambda d: _pt(d, "t2iadapter_canny_sd15v2.pth", _torch(T2I_FULL)), T2I),
    "T2I-Adapter light": (lambda d: _pt(d, "t2iadapter_color_sd14v1.pth", _torch(T2I_LIGHT)), T2I),
    "T2I style adapter": (lambda d: _pt(d, "t2iadapter_style_sd14v1.pth", _torch(T2I_STYLE)),
                          T2I + ["style_embedding"]),
    "CoAdapter fuser": (lambda d: _pt(d, "coadapter-fuser-sd15v1.pth", _torch(COADAPTER_FUSER)), T2I),
    "T2I-Adapter diffusers": (lambda d: _st(d, "diffusion_pytorch_model.safetensors", T2I_DIFFUSERS),
                              T2I + ["adapter.body.0.resnets.0.block1.weight"]),
    "T2I-Adapter in 'adapter'": (lambda d: _pt(d, "t2i.pth", {"adapter": _torch(T2I_FULL)}), T2I),
    "IP-Adapter .bin": (lambda d: _pt(d, "ip-adapter_sd15.bin", {"image_proj": _torch(IP_PROJ),
                                                                 "ip_adapter": _torch(IP_LAYERS)}),
                        IP + ["image_proj.proj.weight"]),
    "IP-Adapter .safetensors": (lambda d: _st(d, "ip-adapter_sd15.safetensors", {
        **{"image_proj." + k: v for k, v in IP_PROJ.items()}, **{"ip_adapter." + k: v for k, v in IP_LAYERS.items()}}),
        IP),
    "IP-Adapter plus": (lambda d: _st(d, "ip-adapter-plus_sd15.safetensors", IP_PLUS), IP + ["image_proj.latents"]),
    "IP-Adapter FaceID (with LoRA layers)": (lambda d: _st(d, "ip-adapter-faceid_sd15.safetensors", IP_FACEID), IP),
    "ESRGAN (old layout)": (lambda d: _pt(d, "4x_foolhardy_Remacri.pth", _torch(ESRGAN_OLD)),
                            ["is an ESRGAN / Real-ESRGAN image upscaler (RRDBNet: model.1.sub.0.RDB1", UPSCALER]),
    "Real-ESRGAN (params_ema)": (lambda d: _pt(d, "RealESRGAN_x4plus.pth", {"params_ema": _torch(REAL_ESRGAN)}),
                                 ["is an ESRGAN / Real-ESRGAN image upscaler (RRDBNet: body.0.rdb1.conv1", UPSCALER]),
    "BSRGAN": (lambda d: _pt(d, "BSRGAN.pth", _torch(BSRGAN)), ["ESRGAN / Real-ESRGAN image upscaler", UPSCALER]),
    "Real-ESRGAN compact (params)": (lambda d: _pt(d, "realesr-general-x4v3.pth", {"params": _torch(COMPACT)}),
                                     ["is a Real-ESRGAN compact image upscaler (SRVGGNetCompact", UPSCALER]),
    "SwinIR (params)": (lambda d: _pt(d, "003_realSR_BSRGAN_DFO_s64w8_SwinIR-M_x4_GAN.pth", {"params": _torch(SWINIR)}),
                        ["is a SwinIR image upscaler (Swin transformer: layers.0.residual_group", UPSCALER]),
    "SD x4 upscaler": (_x4_upscaler, ["is the Stable Diffusion x4 upscaler (low_scale_model.", SD1]),
    "CLIP vision (transformers)": (lambda d: _st(d, "model.safetensors", CLIP_VISION),
                                   ["is a CLIP image encoder (vision_model.", BASE]),
    "CLIP vision (OpenCLIP)": (lambda d: _pt(d, "clip_vision_g.pth", _torch(OPENCLIP_VISUAL)),
                               ["is a CLIP image encoder (visual.conv1.weight)", BASE]),
    "full CLIP (transformers)": (lambda d: _st(d, "model.safetensors", CLIP_FULL),
                                 ["is a full CLIP model (text and image encoders: text_model.", BASE]),
    "full OpenCLIP": (lambda d: _pt(d, "open_clip_pytorch_model.bin", _torch(OPENCLIP_FULL)),
                      ["is a full CLIP model (text and image encoders: token_embedding.weight", BASE]),
    "AnimateDiff motion module": (lambda d: _pt(d, "mm_sd_v15_v2.ckpt", _torch(MOTION_MODULE)),
                                  ["is an AnimateDiff motion module (down_blocks.0.motion_modules.0", BASE]),
    "SD3 single file": (lambda d: _st(d, "sd3_medium_incl_clips.safetensors", SD3),
                        ["is a Stable Diffusion 3 / 3.5 (MMDiT) model (model.diffusion_model.joint_blocks.0", SD1]),
    "Flux (BFL)": (lambda d: _st(d, "flux1-dev.safetensors", FLUX), ["is a Flux model (double_blocks.0.img_attn", SD1]),
    "Flux (ComfyUI)": (lambda d: _st(d, "flux1-dev-fp8.safetensors", {U + k: v for k, v in FLUX.items()}),
                       ["is a Flux model (model.diffusion_model.double_blocks.0.img_attn", SD1]),
    "PixArt .pth": (lambda d: _pt(d, "PixArt-XL-2-1024-MS.pth", {"state_dict": _torch(PIXART)}),
                    ["is a PixArt / Sana (DiT) model (y_embedder.y_proj.fc1.weight)", SD1]),
    "SDXL": (lambda d: save_safetensors(d / "sd_xl_base_1.0.safetensors", _sd1(**{
        "conditioner.embedders.1.model.positional_embedding": _t(77, 8)}), None),
        ["this file holds text encoders of two layouts, SDXL's (conditioner.embedders.1.model.positional_embedding",
         SD1]),
    "rinongal embedding (ParameterDict)": (_rinongal_embedding, [
        "is a textual-inversion embedding (string_to_param, string_to_token)",
        "pass it with --embedding FILE[:TOKEN]"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_convert_names_the_kind_in_one_line(tmp_path, case):
    err = convert_fails_naming(tmp_path, *CASES[case])
    assert "refuses to load global" not in err and "expected a tensor" not in err


@pytest.mark.parametrize("case", ["T2I-Adapter .pth", "IP-Adapter .bin", "Real-ESRGAN (params_ema)", "SD x4 upscaler",
                                  "CLIP vision (transformers)", "SD3 single file", "Flux (BFL)", "SDXL",
                                  "rinongal embedding (ParameterDict)"])
def test_txt2img_and_load_name_the_kind(tmp_path, case):
    make, needles = CASES[case]
    src = make(tmp_path)
    rc, stdout, err = cli("txt2img", "--checkpoint", src, "--prompt", "x", "--out", tmp_path / "o")
    assert rc == 2
    assert_failed(rc, err, None, *needles)
    assert not (tmp_path / "o").exists()
    with pytest.raises(CheckpointError) as caught:
        ldm_jax.load(src)
    message = str(caught.value)
    assert "\n" not in message and all(n in message for n in needles), message


@pytest.mark.parametrize("keys,kind", [
    ({"joint_blocks.0.x_block.mlp.fc1.weight"}, "a Stable Diffusion 3 / 3.5 (MMDiT) model"),  # bare SD3.5 DiT
    ({"txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1.bias", "double_blocks.0.img_attn_qkv.weight",
      "single_blocks.0.linear1.weight"}, "a HunyuanVideo model"),
    ({"double_layers.0.attn.w1q.weight", "cond_seq_linear.weight"}, "an AuraFlow model"),
    ({"mlp_t5.0.weight", "x_embedder.proj.weight"}, "a Hunyuan-DiT model"),
    ({"clf.1.weight", "clip_txt_mapper.weight"}, "a Stable Cascade model"),
    ({U + "input_blocks.1.1.time_stack.0.attn1.to_q.weight", U + "input_blocks.0.0.weight"},
     "a Stable Video Diffusion model"),
    ({"model.1.sub.0.RDB1.conv1x1.weight", "model.0.weight"}, "an ESRGAN / Real-ESRGAN image upscaler"),  # ESRGAN+
    ({"adapter.body.0.in_conv.weight", "adapter.body.0.resnets.0.block1.weight", "adapter.body.0.out_conv.weight"},
     "a T2I-Adapter"),  # diffusers LightAdapter
    ({"transformer_layes.0.ln_1.weight", "spatial_ch_projs.0.weight"}, "a T2I-Adapter"),  # CoAdapter fuser
    ({"double_blocks.0.img_attn.qkv.lora_A.weight"}, "a LoRA"),  # a Flux LoRA is a LoRA, not a Flux model
    ({"ip_adapter.1.to_k_ip.weight"}, "an IP-Adapter"),
    ({"up_blocks.1.motion_modules.2.temporal_transformer.proj_out.weight"}, "an AnimateDiff motion module"),
])
def test_describe_recognises_each_key_family(keys, kind):
    message = describe({k: _t(2, 2) for k in keys})
    assert message is not None and message.startswith(f"this file is {kind} ("), message
    assert "\n" not in message and message.count(";") == 1, message  # convert.lora / vae_file keep the part before ";"


def test_x4_upscaler_named_from_its_7_input_channels():
    message = describe({**tiny_state_dict(), U + "input_blocks.0.0.weight": _t(32, 7, 3, 3)})
    assert message is not None and "is the Stable Diffusion x4 upscaler (model.diffusion_model.input_blocks.0.0." \
                                   "weight: 7 input channels" in message, message


def test_not_mistaken_for_an_add_on():
    """Near misses stay unknown (None) rather than named wrongly."""
    assert describe({"body.0.weight": _t(4, 3, 3, 3)}) is None  # one layer only: not enough for SRVGGNetCompact
    assert describe({"body.0.weight": _t(4, 3, 3, 3), "body.1.weight": _t(4), "head.weight": _t(2)}) is None
    assert describe({"layers.0.weight": _t(2, 2), "visualisation.weight": _t(2)}) is None
    # a diffusers UNet is still a diffusers UNet (conv_in without T2I body.* blocks)
    assert "diffusers UNet2DConditionModel" in describe({"conv_in.weight": _t(8, 4, 3, 3),
                                                         "down_blocks.0.resnets.0.conv1.weight": _t(8, 8, 3, 3)})


def _full_size_sd1(in_channels=4):
    """The full-size SD 1.x CompVis key set with the extras real files carry (zero-cost broadcast views)."""
    shapes = abstract_params(configs.sd1_inpaint() if in_channels == 9 else configs.sd1())
    sd = {e.key: np.broadcast_to(np.float32(0), e.compvis_shape) for c in shapes for e in key_table(c, shapes[c])}
    ema = {e.ema_key: sd[e.key] for e in key_table("unet", shapes["unet"])}
    extras = {k: _t(1000) for k in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                                    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1")}
    extras.update({"logvar": _t(1000), "model_ema.decay": _t(), "model_ema.num_updates": _t(),
                   "cond_stage_model.transformer.text_model.embeddings.position_ids": _t(1, 77)})
    return sd, ema, extras


@pytest.mark.parametrize("in_channels,kind", [(4, "sd1"), (9, "sd1-inpaint")])
def test_real_sd1_key_sets_are_never_named_another_kind(in_channels, kind):
    sd, ema, extras = _full_size_sd1(in_channels)
    for variant in ({**sd, **extras}, {**sd, **ema, **extras}, sd):  # pruned, full with EMA, bare
        assert describe(variant) is None
        assert detect_kind(variant) == kind
    old_clip = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
                for k, v in sd.items()}  # older files omit `text_model.`
    assert describe(old_clip) is None and detect_kind(normalise_keys(old_clip)) == kind
    for prefix in ("first_stage_model.", "cond_stage_model."):  # parts missing: still not another kind
        part = {k: v for k, v in sd.items() if not k.startswith(prefix)}
        assert describe(part) is None
        with pytest.raises(CheckpointError, match="^(not a Stable Diffusion|unsupported checkpoint: no CLIP)"):
            detect_kind(part)


def test_tiny_sd1_ckpt_with_callbacks_and_ema_still_converts_and_loads(tmp_path, monkeypatch):
    """A Lightning .ckpt (ModelCheckpoint stub, EMA weights) still reads, converts and loads after the new kinds."""
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")  # a fake Lightning, for torch.save only
    mod.ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": mod.__name__})
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    sd = tiny_state_dict()
    sd.update({"model_ema." + k[len("model."):].replace(".", ""): v for k, v in sd.items() if k.startswith(U)})
    sd.update({"model_ema.decay": np.full((), 0.9999, np.float32), "model_ema.num_updates": np.ones((), np.int32)})
    src = save_ckpt(tmp_path / "tiny.ckpt", sd, callbacks={mod.ModelCheckpoint: {"best_model_path": "x.ckpt"}})
    rc, _, err = cli("convert", src, tmp_path / "out", "--preset", "tiny")
    assert rc == 0, err
    assert ldm_jax.load(tmp_path / "out").config == configs.tiny()
    assert ldm_jax.load(src, config=configs.tiny()).metadata["ema"] is True


def test_parameter_dict_stub_runs_and_imports_nothing(tmp_path):
    """The ParameterDict stub reads a rinongal embedding without importing torch or running anything from it."""
    src = _rinongal_embedding(tmp_path)
    run_python(f"""
        import sys
        from convert.ckpt_reader import read_ckpt, _InertStub
        obj = read_ckpt({str(src)!r})
        holder = obj["string_to_param"]
        assert isinstance(holder, _InertStub) and type(holder).__qualname__ == "ParameterDict", holder
        assert holder.state["_parameters"]["*"].shape == (1, 768)  # kept as inert data
        assert "torch" not in sys.modules
    """)


def test_parameter_dict_stub_does_not_open_the_door(tmp_path):
    """A file holding a ParameterDict and a payload is still refused before the payload runs."""
    marker = tmp_path / "pwned"
    torch.save({"string_to_param": torch.nn.ParameterDict(), "evil": _Payload(str(marker))}, tmp_path / "evil.pt")
    rc, _, err = cli("convert", tmp_path / "evil.pt", tmp_path / "out")
    assert_failed(rc, err, tmp_path / "out", "refuses to load global", "open'")
    assert not marker.exists()
