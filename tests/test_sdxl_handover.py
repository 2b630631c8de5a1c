"""SDXL's ensemble of expert denoisers: the base hands its noisy latents to the refiner (`samplers.handover_step`,
`txt2img(denoising_end=)` / `txt2img(denoising_start=)`, `ldm_jax.base_and_refiner`).

(a) Split with one model, the two halves equal the unsplit run (Euler a: its hand-over state is sigma-space x /
    sigma_max, the k-samplers' input convention; same noise per loop step): <= 1e-5 relative.
(b) Against diffusers: `StableDiffusionXLPipeline(denoising_end=0.7, output_type="latent")` on the tiny base U-Net,
    then `StableDiffusionXLImg2ImgPipeline(image=those latents, denoising_start=0.7)` with the refiner's settings on
    the tiny refiner U-Net (DDIM, CFG 7.5, our text encodings handed in). Each half <= 1e-4 relative.
(c) Hand-over steps: diffusers' rule, t >= round(T - f T), on each sampler's time steps; bad requests are one line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ldm_jax
from ldm_jax import configs, samplers
from ldm_jax.errors import UserError
from ldm_jax.models.build import random_params
from ldm_jax.stable_diffusion import StableDiffusion
from tests.parity import rel_err

SD = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
PROMPTS = ["a red cat on a mat", "two blue squares"]


@pytest.fixture(scope="module")
def models():
    base, refiner = configs.tiny_xl(), configs.tiny_xl_refiner()
    return StableDiffusion(base, random_params(base, seed=1)), StableDiffusion(refiner, random_params(refiner, seed=2))


def test_handover_steps_follow_diffusers_cutoff():
    cfg = configs.sdxl().schedule
    assert samplers.handover_step("ddim", cfg, 5, 0.7) == 3  # t 801 601 401 | 201 1 (cutoff 300)
    assert samplers.handover_step("ddim", cfg, 50, 0.8) == 40  # diffusers' guide: 40 of 50 steps on the base
    assert samplers.handover_step("euler_a", cfg, 10, 0.5) == 5  # t = linspace(999, 0, 10) >= 500
    for name in samplers.SAMPLERS:
        times = samplers.loop_timesteps(name, cfg, 20)
        assert len(times) == samplers.n_loop_steps(name, 1000, 20) and (np.diff(times) < 0).all(), name
    with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
        samplers.handover_step("ddim", cfg, 5, 1.0)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler_a"])
def test_split_run_with_one_model_equals_the_whole_run(name):
    """A toy eps_theta (x / 2 + t / 1000): stopping at end_step and going on from start_step = end_step gives the
    whole run, the per-step noise included (DPM++ 2M and PLMS restart their history, so they differ there)."""
    import jax

    from ldm_jax.schedules import make_schedule

    schedule, steps = make_schedule(configs.sdxl().schedule), 8
    x_T = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype(np.float32)
    keys = jax.random.split(jax.random.key(3), 2)
    eps_fn = lambda x, t: x / 2 + t[:, None, None, None] / 1000.0  # noqa: E731
    run = jax.jit(lambda x, start, end: samplers.sample(name, eps_fn, x, schedule, keys, steps=steps,
                                                        start_step=start, end_step=end), static_argnums=2)
    k = samplers.handover_step(name, configs.sdxl().schedule, steps, 0.5)
    whole, handed = np.asarray(run(x_T, 0, None)), run(x_T, 0, k)
    assert 0 < k < steps and rel_err(np.asarray(run(handed, k, None)), whole) <= 1e-5


def test_base_and_refiner_match_diffusers_denoising_end_and_start(models):
    import diffusers

    from convert import torch_reference
    from convert.keys import layout_of
    from convert.mapping import params_to_state_dict

    base, refiner = models
    x_T = np.random.default_rng(4).standard_normal((2, 16, 24, 4)).astype(np.float32)
    kw = dict(steps=5, guidance_scale=7.5, height=32, width=48, negative_prompts=["blurry"] * 2)
    handed = np.asarray(ldm_jax.txt2img(base, PROMPTS, latents=x_T, output="latents", denoising_end=0.7, **kw))
    final = np.asarray(ldm_jax.base_and_refiner(base, refiner, PROMPTS, handover=0.7, latents=x_T,
                                                output="latents", **kw))

    def unet(model):
        ref = torch_reference.build_unet(model.config)
        ref.load_compvis(params_to_state_dict({"unet": model.params["unet"]}, text_layout=layout_of(model.config)))
        return ref.unet.eval()

    def encode(model, texts):
        ctx, pooled = model.encode_text(model.params, model.tokenize(texts), pooled=True)
        return torch.from_numpy(np.array(ctx)), torch.from_numpy(np.array(pooled))

    def parts(model):
        (ctx, pooled), (neg, neg_pooled) = encode(model, PROMPTS), encode(model, ["blurry"] * 2)
        return dict(prompt_embeds=ctx, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
                    negative_pooled_prompt_embeds=neg_pooled, num_inference_steps=5, guidance_scale=7.5,
                    output_type="latent")

    shared = dict(vae=diffusers.AutoencoderKL(block_out_channels=(32, 64), norm_num_groups=32), text_encoder=None,
                  text_encoder_2=None, tokenizer=None, tokenizer_2=None, add_watermarker=False)
    sched = lambda: diffusers.DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False,  # noqa: E731
                                            clip_sample=False, timestep_spacing="leading")
    first = diffusers.StableDiffusionXLPipeline(unet=unet(base), scheduler=sched(), **shared)
    first.set_progress_bar_config(disable=True)
    second = diffusers.StableDiffusionXLImg2ImgPipeline(unet=unet(refiner), scheduler=sched(),
                                                        requires_aesthetics_score=True,
                                                        force_zeros_for_empty_prompt=False, **shared)
    second.set_progress_bar_config(disable=True)
    nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # noqa: E731
    with torch.no_grad():
        want_handed = first(**parts(base), latents=nchw(x_T), height=32, width=48,
                            denoising_end=0.7).images.numpy().transpose(0, 2, 3, 1)
        want = second(**parts(refiner), image=nchw(want_handed.copy()),
                      denoising_start=0.7).images.numpy().transpose(0, 2, 3, 1)
    errs = rel_err(handed, want_handed), rel_err(final, want)
    print(f"hand-over at 0.7 (DDIM 5 steps): base {errs[0]:.2e}, refiner {errs[1]:.2e}")
    assert max(errs) <= 1e-4


@pytest.mark.parametrize("kwargs,match", [
    (dict(denoising_start=0.5), "denoising_start goes on from the latents another model handed over"),
    (dict(denoising_end=1.0), r"denoising_end must be in \(0, 1\), got 1.0"),
    (dict(denoising_end=0.3, denoising_start=0.5, latents=np.zeros((16, 16, 4), np.float32)),
     r"denoising_end \(0.3\) must be past denoising_start \(0.5\)"),
])
def test_bad_handover_requests_are_one_line(models, kwargs, match):
    with pytest.raises(UserError, match=match):
        ldm_jax.txt2img(models[0], "x", height=32, width=32, steps=4, **kwargs)
    with pytest.raises(UserError, match="the base model must be an SDXL base model"):
        ldm_jax.base_and_refiner(models[1], models[1], "x")
    with pytest.raises(UserError, match="the refiner must be an SDXL refiner model"):
        ldm_jax.base_and_refiner(models[0], models[0], "x")
    with pytest.raises(UserError, match="aesthetic scores are for the SDXL refiner"):
        ldm_jax.txt2img(models[0], "x", aesthetic_scores=(6.0, 2.0))
    with pytest.raises(UserError, match="negative aesthetic score must be a finite number"):
        ldm_jax.txt2img(models[1], "x", aesthetic_scores=(6.0, float("nan")))


def test_cli_txt2img_with_refiner(models, tmp_path):
    """`ldm-jax txt2img --refiner FILE`: the image of `base_and_refiner` with the same request, its PNG text naming
    the refiner and the switch; a refiner that is not one, or --refiner-switch alone, is one line before loading."""
    from PIL import Image

    from convert.keys import layout_of
    from convert.mapping import params_to_state_dict
    from convert.safetensors_io import write_safetensors
    from ldm_jax.loading import CONFIG_METADATA_KEY
    from tests.cli_run import cli

    paths = []
    for model in models:
        paths.append(tmp_path / f"{model.config.name}.safetensors")
        write_safetensors(paths[-1], params_to_state_dict(model.params, text_layout=layout_of(model.config)),
                          {CONFIG_METADATA_KEY: model.config.to_json()})
    base, refiner = paths
    rc, out, err = cli("txt2img", "--checkpoint", base, "--refiner", refiner, "--refiner-switch", 0.6, "--prompt",
                       "a cat", "--steps", 4, "--height", 32, "--width", 32, "--seed", 5, "--aesthetic-score", 7,
                       "--out", tmp_path / "out")
    assert rc == 0, err
    saved = Image.open(next((tmp_path / "out").glob("*.png")))
    info = saved.info
    assert (info["refiner"], info["refiner_switch"], info["model"], info["aesthetic_scores"]) == (
        refiner.name, "0.6", "tiny-xl", "7.0, 2.5")
    want = ldm_jax.base_and_refiner(ldm_jax.load(base), ldm_jax.load(refiner), "a cat", handover=0.6, steps=4,
                                    height=32, width=32, seed=5, aesthetic_scores=(7.0, 2.5))
    np.testing.assert_array_equal(np.asarray(saved), want[0])
    for argv, message in (((base, "--refiner", base), "a tiny-xl model, not the SDXL refiner"),
                          ((base, "--refiner-switch", 0.5), "--refiner-switch needs --refiner FILE"),
                          ((refiner, "--refiner", refiner), "--refiner takes over from an SDXL base model"),
                          ((base, "--aesthetic-score", 5), "aesthetic scores are for the SDXL refiner")):
        rc, _, err = cli("txt2img", "--checkpoint", *argv, "--prompt", "x", "--out", tmp_path / "no")
        assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "no").exists()
