"""One compiled program per request shape: text encoding, the whole sampling loop with classifier-free
guidance, and VAE decoding, as a single `jax.jit` (no host round-trips inside).

Static (a new program): mode, sampler, steps, output kind, batch and image size. Traced (never recompile):
guidance scale, eta, img2img strength (as the loop's start step) and the seed (per-image key data).

Guidance (Ho & Salimans 2022): eps = eps_u + s (eps_c - eps_u), with the unconditional and conditional
rows interleaved ([x_0, x_0, x_1, x_1, ...]) so that a batch shard stays on its device.

v-prediction models (`ScheduleConfig.prediction == "v"`, SD 2.x 768-v; Salimans & Ho 2022): the U-Net outputs
v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0, and the samplers, which take eps, get eps = sqrt(ab_t) v + sqrt(1 - ab_t) x_t
(`eps_from_output`). Guidance is applied to the U-Net's output, v or eps: the conversion is affine in the output
with the same x_t and coefficients for both rows, so guiding v then converting equals converting both then guiding
(the sqrt(1 - ab_t) x_t terms cancel in the difference), and it costs one conversion instead of two (diffusers also
guides v). The t is the integer time step the U-Net gets, also for the k-samplers (dpmpp_2m, euler_a), which round
their continuous sigma's t: converting with that t's alpha_bar inverts exactly what a v-model is told, so a v-model
equals its eps-model twin whatever the sampler. diffusers' k-schedulers (and k-diffusion) convert with the
continuous sigma instead: the same where the grid's t are integers (euler_a with S - 1 dividing T - 1), close
elsewhere (1e-4 .. 2.5e-4 relative on tests/test_v_prediction.py's toy chains). PLMS thus combines eps, each
converted at its own (x, t); diffusers' PNDMScheduler combines the raw v of different steps instead (not followed).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ldm_jax import samplers
from ldm_jax.errors import UserError
from ldm_jax.schedules import make_schedule

# Per-image key streams: fold_in(image_key, stream) for these purposes.
INIT_NOISE, SAMPLER_NOISE, INIT_IMAGE_NOISE = 0, 1, 2


def _interleave(a, b):
    """[a0, b0, a1, b1, ...] from a, b [B, ...]: each shard of the batch keeps its pair on its own device."""
    return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def _split_pairs(y):
    """The inverse of `_interleave`: [2B, ...] -> (rows 0, 2, 4, ...; rows 1, 3, 5, ...)."""
    y = y.reshape((y.shape[0] // 2, 2) + y.shape[1:])
    return y[:, 0], y[:, 1]


def eps_from_output(schedule, prediction: str, out, x, t):
    """eps_theta(x_t, t) from the U-Net's output `out` at x_t = x [B, h, w, C] and integer t [B] (or a scalar):
    `out` itself for an eps-prediction model (unchanged, bit for bit); for a v-prediction model
    eps = sqrt(ab_t) v + sqrt(1 - ab_t) x_t in fp32 (from v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0 and
    x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps; diffusers' DDIMScheduler `pred_epsilon` for "v_prediction")."""
    if prediction == "eps":
        return out
    if prediction != "v":
        raise ValueError(f"schedule.prediction must be 'eps' or 'v', got {prediction!r}")
    t = jnp.asarray(t, jnp.int32)
    shape = t.shape + (1,) * (x.ndim - t.ndim)
    a = schedule.sqrt_alphas_cumprod[t].reshape(shape)
    b = schedule.sqrt_one_minus_alphas_cumprod[t].reshape(shape)
    return a * out.astype(jnp.float32) + b * x.astype(jnp.float32)


def guided_eps_fn(sd, params, ctx, uncond_ctx, guidance, extra_channels=None, schedule=None, y=None, uncond_y=None):
    """eps(x, t) with classifier-free guidance; `extra_channels` [B, h, w, k] are concatenated to x
    (the inpainting U-Net's mask and masked-image latents); y / uncond_y [B, adm]: SDXL's vector conditioning.
    A v-prediction model's guided output is converted to eps (`eps_from_output`) with `schedule` (default: the
    model's own, `make_schedule(sd.config.schedule)`)."""
    prediction = sd.config.schedule.prediction
    if prediction != "eps" and schedule is None:
        schedule = make_schedule(sd.config.schedule)
    y_pairs = () if y is None else (_interleave(uncond_y, y),)  # y only for SDXL: other models' signature as before

    def eps_fn(x, t):
        xin = x if extra_channels is None else jnp.concatenate([x, extra_channels.astype(x.dtype)], axis=-1)
        # rows [u0, c0, u1, c1, ...]
        out_u, out_c = _split_pairs(sd.predict_noise(params, _interleave(xin, xin), jnp.repeat(t, 2),
                                                     _interleave(uncond_ctx, ctx), *y_pairs))
        return eps_from_output(schedule, prediction, out_u + guidance * (out_c - out_u), x, t)

    return eps_fn


def _streams(seeds):
    """seeds uint32 [B, 2] = (seed mod 2^32, image index) -> the per-image key streams. key(seed) seeds like a
    Python int seed (JAX keeps its low 32 bits), and fold_in(., index) gives image i its own stream; here
    rather than on the host, where each step was a small eager program compiled in every new process."""
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(r[0]), r[1]))(seeds)  # [B] typed keys
    return {s: jax.vmap(lambda k, s=s: jax.random.fold_in(k, s))(keys)
            for s in (INIT_NOISE, SAMPLER_NOISE, INIT_IMAGE_NOISE)}


def _normal(keys, shape):
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def program_args(*, params, ids, uncond_ids, seeds, latents=None, init=None, mask=None, guidance, eta,
                 start_step) -> tuple:
    """The positional arguments of `build_program`'s `run`, in its order: arrays to call or lower it with, or
    `jax.ShapeDtypeStruct`s to compile it from shapes alone (`bench.txt2img_program_memory`)."""
    return (params, ids, uncond_ids, seeds, latents, init, mask, guidance, eta, start_step)


def check_mode(config, mode: str) -> None:
    """An inpainting checkpoint (its U-Net reads the mask and the masked image: 9 input channels) only inpaints."""
    if config.is_inpainting and mode != "inpaint":
        raise UserError(f"this is an inpainting model (its U-Net takes 9 input channels: latents, mask, masked image); "
                        f"it cannot run {mode}: use inpaint (`ldm-jax inpaint --init IMG --mask MASK`) or another "
                        "checkpoint")


def build_program(sd, *, mode: str, sampler: str, steps: int, output: str, latent_hw: tuple[int, int],
                  given_latents: bool, progress: Callable[[int], None] | None, end_step: int | None = None,
                  aesthetic_scores: tuple[float, float] | None = None) -> Callable:
    """The function to jit:
    run(params, ids, uncond_ids, seeds, latents, init, mask, guidance, eta, start_step) -> images | latents.

    ids/uncond_ids int32 [B, L]; seeds uint32 [B, 2] (seed mod 2^32, image index); latents [B, h, w, 4] (x_T,
    used if given_latents); init [B, H, W, 3] in [-1, 1] (img2img, inpaint); mask [B, H, W, 1], 1 = repaint.
    txt2img starts at loop step start_step (0, or where the base model handed over: then latents are the state it
    returned) and with end_step stops before that loop step (`samplers.sample`; the hand-over to a refiner).
    aesthetic_scores: the SDXL refiner's (prompt, negative prompt) scores (default 6.0, 2.5), constants of the program.
    """
    f = sd.latent_factor
    inpaint_unet = sd.config.is_inpainting
    check_mode(sd.config, mode)

    def run(params, ids, uncond_ids, seeds, latents, init, mask, guidance, eta, start_step):
        params = sd.cast_params(params)  # bf16 kernels once, not in every step of the loop
        # built while tracing, so its arrays are constants of the program: built outside, each array was an
        # eager `jnp.asarray` (one small XLA compile, 0.8 s in a new GPU process with the weights loading)
        schedule = make_schedule(sd.config.schedule)
        streams = _streams(seeds)
        # one text-encoder pass over [c0, u0, c1, u1, ...] (one trace of CLIP instead of two: ~0.35 s less per
        # new program at SD 1.x size)
        h, w = latent_hw
        ctx, uncond_ctx, y, uncond_y = _conditioning(sd, params, ids, uncond_ids, (h * f, w * f), aesthetic_scores)
        c = sd.config.unet.out_channels
        noise = latents.astype(jnp.float32) if given_latents else _normal(streams[INIT_NOISE], (h, w, c))
        extra, known = None, None
        if mode == "txt2img":
            x_T, start = noise, start_step
        else:
            z0 = sd.encode_image(params, init)  # posterior mean, scaled  [B, h, w, 4]
            if mode == "img2img":
                x_T = samplers.noise_to_start(sampler, schedule, z0, noise, steps, start_step)
                start = start_step
            else:
                m_lat = _downsample_mask(mask, f)  # [B, h, w, 1], 1 = repaint
                if inpaint_unet:  # conditioning channels: latent mask and the masked image's latents
                    extra = jnp.concatenate([m_lat, sd.encode_image(params, init * (mask < 0.5))], axis=-1)
                else:  # mask-blend painting: the known region follows x0 noised to each step's level
                    known = samplers.Known(z0, 1.0 - m_lat, _normal(streams[INIT_IMAGE_NOISE], (h, w, c)))
                x_T = samplers.noise_to_start(sampler, schedule, z0, noise, steps, start_step)
                start = start_step
        eps_fn = guided_eps_fn(sd, params, ctx, uncond_ctx, guidance, extra, schedule, y, uncond_y)
        z = samplers.sample(sampler, eps_fn, x_T, schedule, streams[SAMPLER_NOISE], steps=steps, eta=eta,
                            start_step=start, end_step=end_step, progress=progress, known=known)
        if known is not None:
            z = known.keep * known.x0 + (1.0 - known.keep) * z
        if output == "latents":
            return z
        if progress is not None:  # after the loop (data dependence on z): the decode starts
            jax.debug.callback(lambda _: progress(-1), z[0, 0, 0, 0])
        img = sd.decode_latents(params, z)
        if mode == "inpaint":  # paste the original pixels outside the mask (A1111 "overlay")
            img = jnp.where(mask >= 0.5, img, init)
        return jnp.clip(jnp.round((img + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    return run


def _conditioning(sd, params, ids, uncond_ids, size_hw, aesthetic_scores=None):
    """(ctx, uncond_ctx, y, uncond_y) of a request; y are None but for SDXL, whose y carries the pooled text and
    the image's pixel size `size_hw` (original = target, crop (0, 0)) and whose unconditional side is zeros, context
    and pooled text, for an empty negative prompt (`conditioning.is_empty_prompt`). The refiner's y has the
    aesthetic scores (default 6.0 / 2.5) instead of the target size, and its empty negative prompt is encoded."""
    from ldm_jax import conditioning as C

    pairs = _interleave(ids, uncond_ids)
    if not sd.config.y_numbers:
        ctx, uncond_ctx = _split_pairs(sd.encode_text(params, pairs))
        return ctx, uncond_ctx, None, None
    ctx_pairs, pooled_pairs = sd.encode_text(params, pairs, pooled=True)
    (ctx, uncond_ctx), (pooled, uncond_pooled) = _split_pairs(ctx_pairs), _split_pairs(pooled_pairs)
    if sd.config.is_sdxl_refiner:
        score, negative = aesthetic_scores or (C.AESTHETIC_SCORE, C.NEGATIVE_AESTHETIC_SCORE)
        return (ctx, uncond_ctx, sd.vector_conditioning(pooled, size_hw, aesthetic_score=score),
                sd.vector_conditioning(uncond_pooled, size_hw, aesthetic_score=negative))
    keep = 1.0 - C.is_empty_prompt(uncond_ids, sd.config.text.eos_token_id).astype(jnp.float32)  # [B]
    uncond_ctx, uncond_pooled = uncond_ctx * keep[:, None, None], uncond_pooled * keep[:, None]
    return ctx, uncond_ctx, sd.vector_conditioning(pooled, size_hw), sd.vector_conditioning(uncond_pooled, size_hw)


def _downsample_mask(mask, f: int):
    """[B, H, W, 1] pixel mask -> [B, H/f, W/f, 1] latent mask (max-pool: any repainted pixel repaints its
    latent cell, so the kept region never bleeds into the hole)."""
    b, hh, ww, _ = mask.shape
    m = mask.reshape(b, hh // f, f, ww // f, f, 1).max(axis=(2, 4))
    return (m >= 0.5).astype(jnp.float32)
