"""The wrong kind of file (a LoRA, an embedding, a VAE, a diffusers component or folder, a ControlNet, an
InstructPix2Pix U-Net) passed where a full CompVis checkpoint is expected: one line that names what it is and what
to pass instead, from `ldm-jax convert`, `txt2img --checkpoint`, `verify` and `ldm_jax.load`. Each fake file has a
few small tensors with the real key names of its layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ldm_jax
from convert.errors import CheckpointError
from convert.safetensors_io import write_safetensors
from tests.test_convert import assert_failed, cli, save_safetensors, tiny_state_dict


def _t(*shape):
    return np.zeros(shape, np.float32)


def _st(d, name, tensors):
    write_safetensors(d / name, tensors)
    return d / name


def _pt(d, name, obj):
    torch.save(obj, d / name)
    return d / name


KOHYA_LORA = {
    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": _t(4, 320, 1, 1),
    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": _t(320, 4, 1, 1),
    "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": _t(),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": _t(4, 768),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": _t(768, 4),
}
LYCORIS_LOHA = {
    "lora_unet_mid_block_attentions_0_proj_out.hada_w1_a": _t(320, 4),
    "lora_unet_mid_block_attentions_0_proj_out.hada_w1_b": _t(4, 320),
    "lora_unet_mid_block_attentions_0_proj_out.alpha": _t(),
}
PEFT_LORA = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": _t(4, 320),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": _t(320, 4),
}
DIFFUSERS_OLD_LORA = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": _t(4, 320),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": _t(320, 4),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": _t(4, 768),
}
COMPVIS_VAE = {
    "encoder.conv_in.weight": _t(8, 3, 3, 3), "encoder.down.0.block.0.conv1.weight": _t(8, 8, 3, 3),
    "decoder.conv_out.weight": _t(3, 8, 3, 3), "quant_conv.weight": _t(8, 8, 1, 1),
    "post_quant_conv.weight": _t(4, 4, 1, 1),
}
DIFFUSERS_VAE = {
    "encoder.conv_in.weight": _t(8, 3, 3, 3), "encoder.down_blocks.0.resnets.0.conv1.weight": _t(8, 8, 3, 3),
    "decoder.up_blocks.0.resnets.0.conv1.weight": _t(8, 8, 3, 3), "quant_conv.weight": _t(8, 8, 1, 1),
}
DIFFUSERS_UNET = {
    "conv_in.weight": _t(32, 4, 3, 3), "time_embedding.linear_1.weight": _t(128, 32),
    "down_blocks.0.resnets.0.conv1.weight": _t(32, 32, 3, 3),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": _t(32, 768),
    "conv_norm_out.weight": _t(32), "conv_out.weight": _t(4, 32, 3, 3),
}
CLIP_TEXT = {
    "text_model.embeddings.token_embedding.weight": _t(10, 8),
    "text_model.encoder.layers.0.self_attn.q_proj.weight": _t(8, 8), "text_model.final_layer_norm.weight": _t(8),
}
CONTROLNET_11 = {
    "input_hint_block.0.weight": _t(16, 3, 3, 3), "zero_convs.0.0.weight": _t(32, 32, 1, 1),
    "input_blocks.0.0.weight": _t(32, 4, 3, 3), "middle_block_out.0.weight": _t(32, 32, 1, 1),
}
CONTROLNET_DIFFUSERS = {
    "controlnet_cond_embedding.conv_in.weight": _t(16, 3, 3, 3), "controlnet_down_blocks.0.weight": _t(32, 32, 1, 1),
    "conv_in.weight": _t(32, 4, 3, 3), "time_embedding.linear_1.weight": _t(128, 32),
}

LORA = "is a LoRA"
LORA_TAIL = "pass it with --lora FILE[:SCALE] (or ldm_jax.load(..., loras=)) next to a full Stable Diffusion checkpoint"
EMBEDDING = "is a textual-inversion embedding"
EMB_TAIL = "pass it with --embedding FILE[:TOKEN] (or ldm_jax.load(..., embeddings=)) next to a full Stable"
SINGLE = "ldm-jax reads CompVis single-file checkpoints"
CONTROL = "ControlNets are not supported yet"

# name -> (make(dir) -> path, needles the one error line must contain)
CASES = {
    "kohya LoRA": (lambda d: _st(d, "lora.safetensors", KOHYA_LORA), [LORA, ".lora_down.weight), not a full checkpoint", LORA_TAIL]),
    "LyCORIS LoHa": (lambda d: _st(d, "loha.safetensors", LYCORIS_LOHA), [LORA, "lora_unet_mid_block", LORA_TAIL]),
    "PEFT LoRA": (lambda d: _st(d, "pytorch_lora_weights.safetensors", PEFT_LORA), [LORA, "lora_A", LORA_TAIL]),
    "diffusers LoRA (old)": (lambda d: _st(d, "lora.safetensors", DIFFUSERS_OLD_LORA), [LORA, "lora_linear_layer.down.weight", LORA_TAIL]),
    "kohya LoRA .pt": (lambda d: _pt(d, "lora.pt", {k: torch.from_numpy(v) for k, v in KOHYA_LORA.items()}),
                       [LORA, LORA_TAIL]),
    "A1111 embedding .safetensors": (lambda d: _st(d, "emb.safetensors", {"emb_params": _t(2, 768)}),
                                     [EMBEDDING, "emb_params", EMB_TAIL]),
    "A1111 embedding .pt": (lambda d: _pt(d, "emb.pt", {
        "string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(2, 768, requires_grad=True)},
        "name": "emb", "step": 1000, "sd_checkpoint": "7460a6fa", "sd_checkpoint_name": "sd-v1-4"}),
        [EMBEDDING, "string_to_param", EMB_TAIL]),
    "SDXL embedding": (lambda d: _st(d, "xl.safetensors", {"clip_l": _t(2, 768), "clip_g": _t(2, 1280)}),
                       ["is an SDXL textual-inversion embedding", "clip_",
                        "next to a full Stable Diffusion XL checkpoint"]),
    "diffusers learned_embeds": (lambda d: _pt(d, "learned_embeds.bin", {"<cat-toy>": torch.zeros(768)}),
                                 [EMBEDDING, "<cat-toy>"]),
    "A1111 hypernetwork": (lambda d: _pt(d, "hn.pt", {
        768: [{"linear.0.weight": torch.zeros(2, 2)}], "name": "hn", "layer_structure": [1, 2, 1],
        "activation_func": "linear", "step": 10}), ["is a hypernetwork", "hypernetworks are not supported"]),
    "CompVis VAE": (lambda d: _st(d, "vae-ft-mse-840000-ema-pruned.safetensors", COMPVIS_VAE),
                    ["is an autoencoder (VAE) file", "pass it with --vae (or ldm_jax.load(..., vae=)) next to a full"]),
    "CompVis VAE .ckpt": (lambda d: _pt(d, "vae.ckpt", {"state_dict": {k: torch.from_numpy(v)
                                                                       for k, v in COMPVIS_VAE.items()}}),
                          ["is an autoencoder (VAE) file", "--vae"]),
    "diffusers VAE": (lambda d: _st(d, "diffusion_pytorch_model.safetensors", DIFFUSERS_VAE),
                      ["diffusers-layout autoencoder (AutoencoderKL", SINGLE, "CompVis-layout VAE file"]),
    "diffusers UNet": (lambda d: _st(d, "diffusion_pytorch_model.safetensors", DIFFUSERS_UNET),
                       ["diffusers UNet2DConditionModel", SINGLE]),
    "CLIP text model": (lambda d: _st(d, "model.safetensors", CLIP_TEXT), ["CLIP text encoder", SINGLE]),
    "ControlNet 1.0 (bundled)": (lambda d: save_safetensors(d / "control_sd15_canny.safetensors", {
        **tiny_state_dict(), "control_model.input_hint_block.0.weight": _t(16, 3, 3, 3),
        "control_model.zero_convs.0.0.weight": _t(32, 32, 1, 1)}, None), ["is a ControlNet (bundled", CONTROL]),
    "ControlNet 1.0 (pruned)": (lambda d: _st(d, "control_canny-fp16.safetensors", {
        "control_model.input_blocks.0.0.weight": _t(32, 4, 3, 3),
        "control_model.input_hint_block.0.weight": _t(16, 3, 3, 3)}), ["is a ControlNet (control_model.", CONTROL]),
    "ControlNet 1.1": (lambda d: _st(d, "control_v11p_sd15_canny.safetensors", CONTROLNET_11),
                       ["is a ControlNet", CONTROL]),
    "ControlNet diffusers": (lambda d: _st(d, "diffusion_pytorch_model.safetensors", CONTROLNET_DIFFUSERS),
                             ["is a ControlNet (controlnet_", CONTROL]),
    "InstructPix2Pix": (lambda d: save_safetensors(d / "instruct-pix2pix-00-22000.safetensors", {
        **tiny_state_dict(), "model.diffusion_model.input_blocks.0.0.weight": _t(32, 8, 3, 3)}, None),
        ["InstructPix2Pix U-Net (8 input channels", "not supported yet"]),
    "diffusers pipeline folder": (lambda d: _pipeline_folder(d / "stable-diffusion-v1-5"),
                                  ["is a diffusers pipeline folder (model_index.json, unet/, vae/", SINGLE,
                                   "convert_diffusers_to_original_stable_diffusion.py"]),
    "diffusers component folder": (lambda d: _component_folder(d / "unet"),
                                   ["is a diffusers/transformers model folder (config.json, "
                                    "diffusion_pytorch_model.safetensors)", SINGLE]),
}


def _pipeline_folder(d):
    for sub in ("unet", "vae", "text_encoder"):
        (d / sub).mkdir(parents=True)
    (d / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    _st(d / "unet", "diffusion_pytorch_model.safetensors", DIFFUSERS_UNET)
    return d


def _component_folder(d):
    d.mkdir()
    (d / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    _st(d, "diffusion_pytorch_model.safetensors", DIFFUSERS_UNET)
    return d


FILE_CASES = [c for c in CASES if "folder" not in c]


def convert_fails_naming(tmp_path, make, needles) -> str:
    """`ldm-jax convert` of the file `make(folder)` builds: exit 2, one line holding every needle, nothing written;
    returns stderr."""
    (tmp_path / "src").mkdir()
    src = make(tmp_path / "src")
    rc, stdout, err = cli("convert", src, tmp_path / "out")
    assert rc == 2 and stdout == ""
    assert_failed(rc, err, tmp_path / "out", *needles)
    return err


@pytest.mark.parametrize("case", list(CASES))
def test_convert_names_the_kind_in_one_line(tmp_path, case):
    convert_fails_naming(tmp_path, *CASES[case])


@pytest.mark.parametrize("case", FILE_CASES)
def test_load_names_the_kind(tmp_path, case):
    make, needles = CASES[case]
    with pytest.raises(CheckpointError) as caught:
        ldm_jax.load(make(tmp_path))
    message = str(caught.value)
    assert "\n" not in message and all(n in message for n in needles), message


@pytest.mark.parametrize("case", ["kohya LoRA", "A1111 embedding .pt", "CompVis VAE", "diffusers UNet"])
def test_txt2img_and_verify_name_the_kind(tmp_path, case):
    make, needles = CASES[case]
    src = make(tmp_path)
    for argv in (["txt2img", "--checkpoint", src, "--prompt", "x", "--out", tmp_path / "o"], ["verify", src]):
        rc, stdout, err = cli(*argv)
        assert rc == 2
        assert_failed(rc, err, None, *needles)
    assert not (tmp_path / "o").exists()


def test_load_names_a_diffusers_pipeline_folder(tmp_path):
    with pytest.raises(CheckpointError, match="is a diffusers pipeline folder"):
        ldm_jax.load(_pipeline_folder(tmp_path / "sd15"))


def test_full_checkpoints_are_not_mistaken_for_other_kinds(tmp_path):
    """The kinds detect_kind already knew keep their messages; a real SD 1.x file still converts."""
    from convert.detect import detect_kind

    sd = tiny_state_dict()
    assert detect_kind(sd) == "sd1"
    sd["model.diffusion_model.input_blocks.0.0.weight"] = _t(32, 9, 3, 3)
    assert detect_kind(sd) == "sd1-inpaint"
    sd["model.diffusion_model.input_blocks.0.0.weight"] = _t(32, 5, 3, 3)
    with pytest.raises(CheckpointError, match="^unsupported U-Net with 5 input channels$"):
        detect_kind(sd)
    for extra, message in (({"cond_stage_model.model.ln_final.weight": _t(8)}, "this file holds two text encoders"),
                           ({"conditioner.embedders.0.model.ln_final.weight": _t(8)},
                            "this file holds text encoders of two layouts")):
        with pytest.raises(CheckpointError, match=f"^{message}"):
            detect_kind({**tiny_state_dict(), **extra})
    with pytest.raises(CheckpointError, match="^not a Stable Diffusion checkpoint"):
        detect_kind({"fc.weight": _t(2, 2)})


@pytest.mark.parametrize("key,kind", [
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "LoRA"),  # SDXL kohya
    ("lora_unet_input_blocks_1_1_proj_in.lokr_w1", "LoRA"),  # LyCORIS LoKr, CompVis block names
    ("unet.mid_block.attentions.0.proj_in.lora.down.weight", "LoRA"),  # diffusers LoRACompatible layers
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.up.weight", "LoRA"),
    ("string_to_param.*", "textual-inversion embedding"),
    ("encoder.mid_block.attentions.0.to_q.weight", "diffusers-layout autoencoder"),
    ("first_stage_model.decoder.up.0.block.0.conv1.weight", "autoencoder (VAE) file"),
    ("up_blocks.0.resnets.0.conv1.weight", "diffusers UNet2DConditionModel"),
    ("control_model.middle_block_out.0.weight", "ControlNet"),
])
def test_describe_recognises_each_key_family(key, kind):
    from convert.file_kinds import describe

    message = describe({key: _t(2, 2), "other.weight": _t(2)})
    assert message is not None and (f"is a {kind}" in message or f"is an {kind}" in message), message


def test_describe_leaves_full_checkpoints_to_detect_kind():
    from convert.file_kinds import describe

    assert describe(tiny_state_dict()) is None
    assert describe({**tiny_state_dict(), "conditioner.embedders.0.model.ln_final.weight": _t(8)}) is None
    assert describe({"fc.weight": _t(2, 2)}) is None and describe({}) is None
