"""SDXL sampling (`ldm_jax.conditioning`, `pipelines.program._conditioning`) against diffusers.

(a) The vector conditioning's size/crop part equals diffusers' UNet2DConditionModel `add_time_proj` of
    `add_time_ids` (Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)): <= 1e-4 relative (cos/sin of
    fp32 arguments up to ~1000, where one ulp is 6e-5: XLA's and torch's range reductions differ by 3e-5).
(b) The ids of the second text encoder: the first's, padded with 0 after their first EOS.
(c) Whole txt2img chains: DDIM (eta 0), CFG 7.5, 5 steps, from the same x_T, against diffusers'
    `StableDiffusionXLPipeline` run on the torch reference U-Net (diffusers' own single-file conversion of the same
    sgm-layout weights) with our text encodings handed in as `prompt_embeds` / `pooled_prompt_embeds` (the text
    towers have their own parity tests in tests/test_sdxl_convert.py): its add_time_ids (original = target size,
    crop 0), guidance and DDIM steps; an empty negative prompt is zeros on both sides (`force_zeros_for_empty_prompt`),
    a non-empty one is encoded. Final latents <= 1e-4 relative (measured 2.1e-6 / 2.8e-6; fp32, highest matmul
    precision).
(d) SDXL inpainting (a 9-channel U-Net): the same chain against diffusers' `StableDiffusionXLInpaintPipeline`
    (strength 1, its masked-image latents and x_T handed in: diffusers samples the posterior where ldm-jax takes its
    mean, and starts from pure noise where ldm-jax noises the init image to the first step's level); the mask is
    aligned to latent cells, where diffusers' nearest resize and our max-pool agree. <= 1e-4 relative.
"""

import numpy as np
import pytest
import torch

import ldm_jax
from ldm_jax import configs
from ldm_jax.conditioning import repad, size_embedding, size_numbers
from ldm_jax.models.build import random_params
from ldm_jax.stable_diffusion import StableDiffusion
from tests.parity import rel_err

CFG = configs.tiny_xl()
SD = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.fixture(scope="module")
def model():
    return StableDiffusion(CFG, random_params(CFG, seed=3))


def test_size_embedding_matches_diffusers_add_time_proj():
    from diffusers.models.embeddings import Timesteps

    sizes = np.array([[1024, 768, 0, 0, 1024, 768], [512, 512, 64, 32, 896, 1152]], np.float32)
    proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
    want = proj(torch.from_numpy(sizes).flatten()).reshape(2, -1).numpy()
    got = np.asarray(size_embedding(sizes))
    assert got.shape == (2, 6 * 256)
    assert rel_err(got, want) <= 1e-4
    row = np.asarray(size_numbers(3, (768, 1024)))
    assert row.shape == (3, 6) and row[2].tolist() == [768, 1024, 0, 0, 768, 1024]


def test_second_encoder_ids_are_padded_with_zero(model):
    ids = model.tokenize(["a red cat", ""])
    got = np.asarray(repad(ids, CFG.text.eos_token_id, CFG.text_2.pad_token_id))
    assert got[0, :5].tolist() == ids[0, :5].tolist() and ids[0, 4] == 49407  # BOS a red cat EOS
    assert (got[0, 5:] == 0).all() and got[1, :2].tolist() == [49406, 49407] and (got[1, 2:] == 0).all()


def _diffusers_sdxl_latents(model, prompts, negative, x_T, steps, scale, height, width):
    """diffusers' StableDiffusionXLPipeline (DDIM as CompVis: leading spacing, steps_offset 1) on the torch reference
    U-Net loaded from our sgm-layout export of the same weights, fed our text encodings."""
    import diffusers

    from convert import torch_reference
    from convert.keys import layout_of
    from convert.mapping import params_to_state_dict

    ref = torch_reference.build_unet(CFG)
    ref.load_compvis(params_to_state_dict({"unet": model.params["unet"]}, text_layout=layout_of(CFG)))
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), norm_num_groups=32)  # only its scale factor 2 is read
    sched = diffusers.DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                                    timestep_spacing="leading")
    pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                               tokenizer_2=None, unet=ref.unet.eval(), scheduler=sched,
                                               add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)

    def encode(texts):
        ctx, pooled = model.encode_text(model.params, model.tokenize(texts), pooled=True)
        return torch.from_numpy(np.asarray(ctx)), torch.from_numpy(np.asarray(pooled))

    ctx, pooled = encode(prompts)
    kw = {}
    if negative:  # else diffusers' zeros (force_zeros_for_empty_prompt)
        kw = dict(zip(("negative_prompt_embeds", "negative_pooled_prompt_embeds"), encode([negative] * len(prompts))))
    with torch.no_grad():
        out = pipe(prompt_embeds=ctx, pooled_prompt_embeds=pooled, num_inference_steps=steps, guidance_scale=scale,
                   height=height, width=width, latents=torch.from_numpy(x_T.transpose(0, 3, 1, 2)),
                   output_type="latent", **kw).images
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
def test_txt2img_chain_matches_diffusers_sdxl_pipeline(model, negative):
    prompts = ["a red cat on a mat", "two blue squares"]
    height, width, steps = 32, 48, 5  # 5 divides T: CompVis and diffusers take the same steps
    x_T = np.random.default_rng(5).standard_normal((2, height // 2, width // 2, 4)).astype(np.float32)
    got = ldm_jax.txt2img(model, prompts, negative_prompts=[negative] * 2, steps=steps, guidance_scale=7.5,
                          height=height, width=width, latents=x_T, output="latents")
    want = _diffusers_sdxl_latents(model, prompts, negative, x_T, steps, 7.5, height, width)
    err = rel_err(np.asarray(got), want)
    print(f"SDXL DDIM {steps} steps, negative {negative!r}: rel err {err:.2e}")
    assert err <= 1e-4


@pytest.fixture(scope="module")
def inpaint_model():
    import dataclasses

    cfg = dataclasses.replace(CFG, name="tiny-xl-inpaint", unet=dataclasses.replace(CFG.unet, in_channels=9))
    return StableDiffusion(cfg, random_params(cfg, seed=4))


def test_inpaint_chain_matches_diffusers_sdxl_inpaint_pipeline(inpaint_model):
    import diffusers
    import jax
    from PIL import Image

    from convert import torch_reference
    from convert.keys import layout_of
    from convert.mapping import params_to_state_dict
    from ldm_jax.samplers import noise_to_start
    from ldm_jax.schedules import make_schedule

    model, prompts, steps, (height, width) = inpaint_model, ["a red cat on a mat", "two blue squares"], 5, (32, 48)
    rng = np.random.default_rng(6)
    init = rng.integers(0, 256, (2, height, width, 3), dtype=np.uint8)
    mask = np.zeros((2, height, width), np.float32)
    mask[0, 8:24, 16:40], mask[1, :, 24:] = 1, 1  # on whole latent cells (the VAE's factor is 2)
    noise = rng.standard_normal((2, height // 2, width // 2, 4)).astype(np.float32)
    got = ldm_jax.inpaint(model, prompts, init, mask, negative_prompts=["blurry"] * 2, steps=steps,
                          guidance_scale=7.5, latents=noise, output="latents")

    pixels = init.astype(np.float32) / 127.5 - 1.0
    encode = jax.jit(model.encode_image)
    x_T = noise_to_start("ddim", make_schedule(CFG.schedule), encode(model.params, pixels), noise, steps, 0)
    masked = encode(model.params, pixels * (mask[..., None] < 0.5))
    ref = torch_reference.build_unet(model.config)
    ref.load_compvis(params_to_state_dict({"unet": model.params["unet"]}, text_layout=layout_of(model.config)))
    sched = diffusers.DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                                    timestep_spacing="leading")
    pipe = diffusers.StableDiffusionXLInpaintPipeline(
        vae=diffusers.AutoencoderKL(block_out_channels=(32, 64), norm_num_groups=32), text_encoder=None,
        text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=ref.unet.eval(), scheduler=sched,
        add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)

    def encode_text(texts):
        ctx, pooled = model.encode_text(model.params, model.tokenize(texts), pooled=True)
        return torch.from_numpy(np.asarray(ctx)), torch.from_numpy(np.asarray(pooled))

    nchw = lambda a: torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())  # noqa: E731
    (ctx, pooled), (neg, neg_pooled) = encode_text(prompts), encode_text(["blurry"] * 2)
    with torch.no_grad():
        want = pipe(prompt_embeds=ctx, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
                    negative_pooled_prompt_embeds=neg_pooled, image=[Image.fromarray(i) for i in init],
                    mask_image=[Image.fromarray((m * 255).astype(np.uint8)) for m in mask],
                    masked_image_latents=nchw(masked), latents=nchw(x_T), strength=1.0, num_inference_steps=steps,
                    guidance_scale=7.5, height=height, width=width, output_type="latent").images
    err = rel_err(np.asarray(got), want.numpy().transpose(0, 2, 3, 1))
    print(f"SDXL inpainting DDIM {steps} steps: rel err {err:.2e}")
    assert err <= 1e-4


def test_program_cache_keys_cover_the_sdxl_conditioning_code():
    """The program cache keys a stored program by the code it is built from: SDXL's conditioning is part of it (a
    change there must not reuse a program compiled from the old code)."""
    from ldm_jax.program_key import _program_modules

    assert "ldm_jax.conditioning" in {m.__name__ for m in _program_modules()}
