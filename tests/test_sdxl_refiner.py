"""The SDXL refiner (`sd_xl_refiner_1.0.safetensors`, sgm `sd_xl_refiner.yaml`): detection, config inference, key
layout, parity and sampling.

The refiner keeps one text encoder, OpenCLIP bigG, at `conditioner.embedders.0.model.*` (OpenCLIP names, its
`text_projection` used), a 4-level U-Net of 384 channels with 4-deep transformers at levels 1 and 2 and in the middle
block, and a 2560-wide y = [pooled text, emb(original h, w), emb(crop top, left), emb(aesthetic score)].
References are diffusers' own: `infer_diffusers_model_type` ("xl_refiner") for the key set, its
`create_unet_diffusers_config_from_ldm` for the U-Net's architecture, and `StableDiffusionXLImg2ImgPipeline` with
`requires_aesthetics_score=True` and `force_zeros_for_empty_prompt=False` (the refiner's pipeline settings) on the
torch reference U-Net for whole img2img chains, our text encodings and x_T handed in (the text tower is checked by
`ldm-jax verify` against transformers' CLIPTextModelWithProjection loaded by diffusers' conversion). Tolerances:
<= 1e-4 relative, fp32, highest matmul precision.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import ldm_jax
from convert import torch_reference
from convert.detect import detect_kind, infer_config
from convert.errors import CheckpointError
from convert.keys import key_table, layout_of
from convert.mapping import params_to_state_dict, state_dict_to_params
from ldm_jax import configs
from ldm_jax.models.build import abstract_params, random_params
from ldm_jax.stable_diffusion import StableDiffusion
from tests.cli_run import cli
from tests.parity import rel_err, sgm_original_config

U, OC0 = "model.diffusion_model.", "conditioner.embedders.0.model."
REF = configs.tiny_xl_refiner()
SD = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _zeros(config) -> dict:
    """Zero-cost stand-ins of every tensor of a `config` file in its own layout, with the extras real files carry."""
    shapes = abstract_params(config)
    sd = {e.key: np.broadcast_to(np.float32(0), e.stored_shape)
          for c in shapes for e in key_table(c, shapes[c], text_layout=layout_of(config))}
    sd[OC0 + "logit_scale"] = np.float32(4.6)
    return sd


def test_full_size_refiner_is_detected_and_infers_the_preset():
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm, infer_diffusers_model_type

    full = _zeros(configs.sdxl_refiner())
    assert infer_diffusers_model_type(full) == "xl_refiner"  # diffusers reads our key set as the refiner
    assert detect_kind(full) == "sdxl-refiner" and infer_config(full) == configs.sdxl_refiner()
    assert full[U + "label_emb.0.0.weight"].shape == (1536, 2560)
    assert full[OC0 + "text_projection"].shape == (1280, 1280)
    ours = torch_reference.diffusers_unet_config(configs.sdxl_refiner())
    theirs = create_unet_diffusers_config_from_ldm(sgm_original_config(configs.sdxl_refiner()), full)
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    same = [k for k in ours if k not in ("transformer_layers_per_block", "norm_num_groups")]
    assert {k: norm(ours[k]) for k in same} == {k: norm(theirs[k]) for k in same}
    assert ours["transformer_layers_per_block"] == 4 and theirs["transformer_layers_per_block"] == [4, 4, 4, 4]
    assert theirs["addition_embed_type"] == "text_time" and theirs["projection_class_embeddings_input_dim"] == 2560
    with pytest.raises(CheckpointError, match=r"^unsupported SDXL refiner U-Net with 9 input channels$"):
        detect_kind({**full, U + "input_blocks.0.0.weight": np.broadcast_to(np.float32(0), (384, 9, 3, 3))})


def test_refiner_layout_round_trips_and_keeps_the_projection():
    params = random_params(REF, seed=1)
    sd = params_to_state_dict(params, text_layout=layout_of(REF))
    assert layout_of(REF) == "sgm_open_clip" and all(k.startswith((U, "first_stage_model.", OC0)) for k in sd)
    back, report = state_dict_to_params({**sd, OC0 + "logit_scale": np.float32(4.6)}, abstract_params(REF))
    assert list(report.ignored) == [OC0 + "logit_scale"] and not report.unexpected
    np.testing.assert_array_equal(back["text_encoder"]["text_projection"]["kernel"], sd[OC0 + "text_projection"])
    for a, b in zip(*(jax_leaves(t) for t in (params, back))):
        np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_refiner_y_has_the_aesthetic_score_and_its_empty_negative_prompt_is_encoded():
    from ldm_jax.conditioning import size_embedding
    from ldm_jax.pipelines.program import _conditioning

    model = StableDiffusion(REF, random_params(REF, seed=2))
    pooled = np.ones((1, 32), np.float32)
    y = np.asarray(model.vector_conditioning(pooled, (64, 48), crop_top_left=(8, 0), aesthetic_score=2.5))
    want = np.concatenate([pooled, np.asarray(size_embedding(np.array([[64, 48, 8, 0, 2.5]], np.float32)))], -1)
    np.testing.assert_array_equal(y, want)
    assert y.shape == (1, REF.unet.adm_in_channels)
    ids = model.tokenize(["a red cat"])
    ctx, uncond_ctx, y, uncond_y = _conditioning(model, model.params, ids, model.tokenize([""]), (64, 48))
    assert np.abs(np.asarray(uncond_ctx)).max() > 0.1  # the encoding of "", not zeros as SDXL base
    np.testing.assert_array_equal(np.asarray(y[:, 32:]), np.asarray(model.vector_conditioning(
        np.zeros((1, 32)), (64, 48)))[:, 32:])  # the default score: 6.0
    assert not np.array_equal(np.asarray(y[:, 32:]), np.asarray(uncond_y[:, 32:]))  # 6.0 vs 2.5


@pytest.mark.parametrize("negative,scores", [("", (7.0, 1.5))])  # default scores, "blurry": test_sdxl_handover
def test_img2img_chain_matches_diffusers_refiner_pipeline(negative, scores, monkeypatch):
    import diffusers
    import jax
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as xl_img2img

    model = StableDiffusion(REF, random_params(REF, seed=3))
    prompts, steps, strength, (height, width) = ["a red cat on a mat", "two blue squares"], 5, 0.6, (32, 48)
    rng = np.random.default_rng(7)
    init = rng.integers(0, 256, (2, height, width, 3), dtype=np.uint8)
    noise = rng.standard_normal((2, height // 2, width // 2, 4)).astype(np.float32)
    got = ldm_jax.img2img(model, prompts, init, negative_prompts=[negative] * 2, strength=strength, steps=steps,
                          guidance_scale=7.5, latents=noise, output="latents", aesthetic_scores=scores)

    nchw = lambda a: torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())  # noqa: E731
    z0 = jax.jit(model.encode_image)(model.params, init.astype(np.float32) / 127.5 - 1.0)
    monkeypatch.setattr(xl_img2img, "randn_tensor", lambda shape, **kw: nchw(noise))  # diffusers' noise = ours
    ref = torch_reference.build_unet(REF)
    ref.load_compvis(params_to_state_dict({"unet": model.params["unet"]}, text_layout=layout_of(REF)))
    sched = diffusers.DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                                    timestep_spacing="leading")
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=diffusers.AutoencoderKL(block_out_channels=(32, 64), norm_num_groups=32), text_encoder=None,
        text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=ref.unet.eval(), scheduler=sched,
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)

    def encode(texts):
        ctx, pooled = model.encode_text(model.params, model.tokenize(texts), pooled=True)
        return torch.from_numpy(np.array(ctx)), torch.from_numpy(np.array(pooled))

    (ctx, pooled), (neg, neg_pooled) = encode(prompts), encode([negative] * 2)
    with torch.no_grad():
        want = pipe(prompt_embeds=ctx, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
                    negative_pooled_prompt_embeds=neg_pooled, image=nchw(z0), strength=strength,
                    num_inference_steps=steps, guidance_scale=7.5, output_type="latent",
                    **dict(zip(("aesthetic_score", "negative_aesthetic_score"), scores or ()))).images
    err = rel_err(np.asarray(got), want.numpy().transpose(0, 2, 3, 1))
    print(f"SDXL refiner img2img DDIM {steps} x {strength}, negative {negative!r}, scores {scores}: {err:.2e}")
    assert err <= 1e-4


def test_refiner_file_verifies_and_refuses_training(tmp_path):
    from convert.safetensors_io import write_safetensors

    path = tmp_path / "refiner.safetensors"
    text = dataclasses.replace(REF.text, hidden_size=64, intermediate_size=128, num_heads=1, projection_dim=48)
    unet = dataclasses.replace(REF.unet, d_head=64, d_cond=64, adm_in_channels=48 + 5 * 256)
    inferable = dataclasses.replace(configs.sdxl_refiner(), unet=unet, vae=REF.vae, text=text)
    write_safetensors(path, params_to_state_dict(random_params(inferable, 4), text_layout="sgm_open_clip"))
    assert ldm_jax.load(path).config == inferable  # no config in the header: inferred from the shapes
    rc, out, err = cli("verify", path)
    assert rc == 0 and "parity OK" in out and "pooled (projected EOS)" in out, out + err
    data = tmp_path / "data"
    _captioned_png(data)  # sampling from the CLI: tests/test_sdxl_handover.py
    rc, _, err = cli("train", "--checkpoint", path, "--data", data, "--resolution", 32, "--out", tmp_path / "run")
    assert rc == 2 and "training the SDXL refiner" in err and not (tmp_path / "run").exists(), err


def _captioned_png(directory) -> str:
    from PIL import Image

    directory.mkdir()
    path = directory / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    (directory / "init.txt").write_text("a cat")
    return str(path)


def test_sdxl_embedding_gives_the_refiner_its_clip_g(tmp_path):
    """The refiner's one encoder is SDXL base's second: an SDXL embedding file lends it its clip_g (as ComfyUI)."""
    from convert.embeddings import apply_embeddings
    from convert.safetensors_io import write_safetensors

    model = StableDiffusion(REF, random_params(REF, seed=5))
    clip_g = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)
    write_safetensors(tmp_path / "xl.safetensors", {"clip_l": np.zeros((2, 768), np.float32), "clip_g": clip_g})
    out = apply_embeddings(model, [(str(tmp_path / "xl.safetensors"), "<xlword>")])
    table = np.asarray(out.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"])
    np.testing.assert_array_equal(table[-2:], clip_g)
    assert out.tokenize(["a <xlword>"])[0, 2:4].tolist() == [49408, 49409]
    write_safetensors(tmp_path / "wide.safetensors", {"clip_l": np.zeros((1, 768), np.float32),
                                                      "clip_g": np.zeros((1, 1280), np.float32)})
    with pytest.raises(CheckpointError, match="clip_g is 1280 wide for this tiny-xl-refiner model"):
        apply_embeddings(model, [(str(tmp_path / "wide.safetensors"), "<wide>")])
