"""The latent-diffusion training objective and its per-example randomness.

Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models"), eq. 2 with the conditioning
of eq. 3 — Ho et al. 2020's L_simple applied to latents of a frozen autoencoder:

    L_LDM = E_{z_0 = E(x), c, eps ~ N(0, I), t ~ U{0..T-1}} || eps - eps_theta(z_t, t, tau(c)) ||^2,
    z_t = sqrt(ab_t) z_0 + sqrt(1 - ab_t) eps      (ab_t = alpha_bar_t, `schedules.q_sample`)

as fine-tuned by diffusers' `examples/text_to_image/train_text_to_image_flax.py` (the use case): the loss is the
mean over batch and latent elements (`F.mse_loss(..., reduction="mean")`), z_0 is a *sample* of the autoencoder
posterior q(z|x) times the latent scale (diffusers: `latent_dist.sample(rng) * scaling_factor`; CompVis samples too),
t is uniform over the T table indices, the text encoder is frozen, and with probability `caption_dropout` the
context is replaced by the empty-prompt embedding (the SD 1.x/2.x recipe that makes classifier-free guidance work;
diffusers' `--proportion_empty_prompts`).

v-prediction (`ScheduleConfig.prediction == "v"`, SD 2.x 768-v; Salimans & Ho 2022, "Progressive Distillation for
Fast Sampling of Diffusion Models", sec. 4): the same loss with the target v = sqrt(ab_t) eps - sqrt(1 - ab_t) z_0
(`velocity`; diffusers' `DDPMScheduler.get_velocity`, used as the target by its train_text_to_image.py).

Input perturbation (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in Diffusion Models", DDPM-IP):
z_t is made from eps + gamma xi (xi ~ N(0, I), `draw(input_perturbation=gamma)`, `Draws.x_noise`) while the target
stays eps (v from the unperturbed eps), as diffusers' train_text_to_image.py --input_perturbation does.

Randomness is explicit and independent of how the batch is split over devices and hosts: example i of a step uses
`fold_in(step_key, i)` with i its index in the step's global batch (micro-batch k of a K-step accumulation uses
i = k * B + row), and splits that key into (t, noise, posterior sample, caption dropout).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from ldm_jax.schedules import Schedule, q_sample


class Draws(NamedTuple):
    """The random inputs of a batch: t int32 [B], noise [B, h, w, C] (eps, the eps-target), posterior eps
    [B, h, w, C], drop bool [B], and x_noise [B, h, w, C], the noise z_t is made from where it differs from eps
    (input perturbation: eps + gamma xi), else None."""

    t: jax.Array
    noise: jax.Array
    posterior_eps: jax.Array
    drop: jax.Array
    x_noise: jax.Array | None = None


# fold_in(the noise key, XI_FOLD) draws input perturbation's xi. Not a small index: with JAX's (default) partitionable
# threefry, split(k, n)[i] == fold_in(k, i) and a smaller normal draw is a prefix of a larger one from the same key,
# so fold index i <= log2(latent side) would reuse `multires_noise`'s level-i key (index 2: xi's first h/4 x w/4 x C
# values would be its level-2 noise).
XI_FOLD = 1 << 16


def example_keys(step_key: jax.Array, indices: jax.Array) -> jax.Array:
    """Per-example keys `fold_in(step_key, i)` for global example indices `indices` [B]."""
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.asarray(indices, jnp.uint32))


def multires_noise(key: jax.Array, shape: tuple[int, ...], discount: float) -> jax.Array:
    """Multi-resolution ("pyramid") noise [h, w, C]: white noise plus discount^i times white noise drawn at 1/2^i of
    the resolution and resized up bilinearly (i = 1 .. log2(min(h, w)); the last level is one value per channel,
    i.e. offset noise), rescaled to unit standard deviation (J. Whitaker 2023, "Multi-Resolution Noise for
    Diffusion Model Training"; kohya sd-scripts' --multires_noise_discount).

    Why: SD's schedule keeps sqrt(alpha_bar_T) ~ 0.07 of the image in z_T, so with white noise a model can read the
    coarse layout (which half of the background is light) off z_t in training, never learns it from the caption,
    and at sampling follows whatever the fresh noise's low frequencies say (Lin et al. 2024, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed"). Low-frequency noise weakens that leak: with discount 0.8 the top-minus-
    bottom mean of a 16x16 latent is 3x noisier than with white noise (docs/notes.md: not enough, alone, to make the
    bundled model learn the order of its two-tone backgrounds)."""
    h, w, c = shape
    levels = max(int(min(h, w)).bit_length() - 1, 0)
    keys = jax.random.split(key, levels + 1)
    noise = jax.random.normal(keys[0], shape, jnp.float32)
    for i in range(1, levels + 1):
        coarse = jax.random.normal(keys[i], (max(h >> i, 1), max(w >> i, 1), c), jnp.float32)
        noise = noise + discount ** i * jax.image.resize(coarse, shape, "linear")
    return noise / jnp.std(noise)


def draw(keys: jax.Array, latent_shape: tuple[int, ...], n_steps: int, caption_dropout: float,
         multires_discount: float = 0.0, noise_offset: float = 0.0, input_perturbation: float = 0.0) -> Draws:
    """Draw t ~ U{0..n_steps-1}, eps ~ N(0, I) (or `multires_noise` when `multires_discount` > 0), the posterior's eps
    and the dropout coin for every example. `noise_offset` > 0 adds offset noise to eps: noise_offset times one
    N(0, 1) value per channel, the same at every position (N. Guttenberg 2023, "Diffusion with Offset Noise";
    diffusers' and kohya's --noise_offset, e.g. 0.1), drawn from fold_in(the noise key, 1) so the other draws stay
    the same. It lets the model learn to shift an image's mean brightness and colour, which white noise hides
    (SD without it struggles with very dark or very bright images); the loss's target is the offset noise.

    `input_perturbation` gamma > 0 also draws xi ~ N(0, I) from fold_in(the noise key, XI_FOLD) and sets
    `x_noise` = eps + gamma xi, eps being the noise above (multi-resolution and offset included; diffusers perturbs
    its final noise too). The loss makes z_t from x_noise but keeps eps as the target (Ning et al. 2023, DDPM-IP;
    diffusers' --input_perturbation, kohya's --ip_noise_gamma, e.g. 0.1): at sampling, x_t carries the errors of
    the model's earlier steps (exposure bias), which training on exact x_t never shows it."""

    def one(key):
        k_t, k_noise, k_post, k_drop = jax.random.split(key, 4)
        if multires_discount > 0:
            noise = multires_noise(k_noise, latent_shape, multires_discount)
        else:
            noise = jax.random.normal(k_noise, latent_shape, jnp.float32)
        if noise_offset > 0:
            offset = jax.random.normal(jax.random.fold_in(k_noise, 1), (1,) * (len(latent_shape) - 1)
                                       + latent_shape[-1:], jnp.float32)  # [1, 1, C]
            noise = noise + noise_offset * offset
        x_noise = None
        if input_perturbation > 0:  # eps + gamma xi
            xi = jax.random.normal(jax.random.fold_in(k_noise, XI_FOLD), latent_shape, jnp.float32)
            x_noise = noise + input_perturbation * xi
        return Draws(t=jax.random.randint(k_t, (), 0, n_steps, jnp.int32),
                     noise=noise,
                     posterior_eps=jax.random.normal(k_post, latent_shape, jnp.float32),
                     drop=jax.random.uniform(k_drop, ()) < caption_dropout,
                     x_noise=x_noise)

    return jax.vmap(one)(keys)


def posterior_sample(moments: jax.Array, eps: jax.Array, latent_scale: float) -> jax.Array:
    """z_0 = (mean + exp(logvar / 2) eps) * scale from posterior moments [B, h, w, 2C] (CompVis
    DiagonalGaussianDistribution: logvar clipped to [-30, 20])."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    std = jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))
    return (mean + std * eps) * latent_scale


def drop_captions(ctx: jax.Array, uncond: jax.Array, drop: jax.Array) -> jax.Array:
    """ctx [B, ...] (a context [B, S, d], SDXL's pooled text [B, P]) with the rows where `drop` [B] is set replaced
    by the empty prompt's uncond [1 | B, ...]."""
    drop = drop.reshape(drop.shape + (1,) * (ctx.ndim - 1))
    return jnp.where(drop, jnp.broadcast_to(uncond, ctx.shape).astype(ctx.dtype), ctx)


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
    """SNR_t = alpha_bar_t / (1 - alpha_bar_t) [B] in fp32."""
    ab = schedule.alpha_bar[t].astype(jnp.float32)
    return ab / (1.0 - ab)


def min_snr_weight(schedule: Schedule, t: jax.Array, gamma: float, prediction: str = "eps") -> jax.Array:
    """Min-SNR-gamma loss weight [B] (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    Strategy", eq. 7; diffusers' `--snr_gamma`): min(SNR_t, gamma) / SNR_t for the eps target, and
    min(SNR_t, gamma) / (SNR_t + 1) for the v target (diffusers' train_text_to_image.py, kohya sd-scripts'
    apply_snr_weight): at a fixed x_t, ||eps - eps_theta||^2 = SNR_t ||x_0 - x0_theta||^2 and ||v - v_theta||^2 =
    (SNR_t + 1) ||x_0 - x0_theta||^2, so both weigh the x_0 error by min(SNR_t, gamma).
    SNR_t = alpha_bar_t / (1 - alpha_bar_t). Nearly noise-free steps (SNR_t > gamma), whose large and noisy eps
    errors otherwise dominate the gradient, are down-weighted; with eps, noisy steps (layout, colour: where the
    caption matters) keep weight 1 (with v they get SNR_t / (SNR_t + 1): 0.005 at t = 999 of SD's schedule)."""
    snr_t = snr(schedule, t)
    if _check_prediction(prediction) == "v":
        return jnp.minimum(snr_t, gamma) / (snr_t + 1.0)
    return jnp.minimum(snr_t, gamma) / snr_t


def debiased_weight(schedule: Schedule, t: jax.Array) -> jax.Array:
    """1 / sqrt(SNR_t) [B], SNR_t capped at 1000 (Yu et al. 2024, "Debias the Training of Diffusion Models"; kohya
    sd-scripts' --debiased_estimation_loss): up-weights the noisy steps, where the caption decides the layout that
    nearly clean steps only copy from z_t (x 14.6 at t = 999 of SD's schedule, 1 at SNR 1)."""
    return jax.lax.rsqrt(jnp.minimum(snr(schedule, t), 1000.0))


def _check_prediction(prediction: str) -> str:
    if prediction not in ("eps", "v"):
        raise ValueError(f"schedule.prediction must be 'eps' or 'v', got {prediction!r}")
    return prediction


DEBIASED_V_REFUSED = ("--debiased-loss is for eps-prediction models only: this model predicts v, where its weight is "
                      "unsettled (kohya sd-scripts applies the eps weight 1/sqrt(SNR); its issue #1058 and PR #1715 "
                      "propose 1/(SNR+1)); train without --debiased-loss")


def velocity(schedule: Schedule, z0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """The v-prediction target v = sqrt(ab_t) eps - sqrt(1 - ab_t) z_0 [B, h, w, C] in fp32 (Salimans & Ho 2022;
    diffusers `DDPMScheduler.get_velocity`). z0, noise [B, h, w, C]; t int [B]."""
    t = jnp.asarray(t, jnp.int32)
    shape = t.shape + (1,) * (z0.ndim - t.ndim)
    a = schedule.sqrt_alphas_cumprod[t].reshape(shape)
    b = schedule.sqrt_one_minus_alphas_cumprod[t].reshape(shape)
    return a * noise.astype(jnp.float32) - b * z0.astype(jnp.float32)


def diffusion_loss(eps_fn: Callable, schedule: Schedule, z0: jax.Array, t: jax.Array, noise: jax.Array,
                   ctx: jax.Array, snr_gamma: float | None = None, debiased: bool = False,
                   prediction: str = "eps", weights: jax.Array | None = None,
                   x_noise: jax.Array | None = None) -> jax.Array:
    """mean || target - eps_fn(q_sample(z0, t, x_noise), t, ctx) ||^2 in fp32 (the L_simple of the module docstring)
    with x_noise = noise unless given (input perturbation's eps + gamma xi, `Draws.x_noise`) and target = noise
    (prediction "eps") or `velocity(schedule, z0, t, noise)` (prediction "v"), the unperturbed noise; with `snr_gamma`
    each example's mean squared error is weighted by `min_snr_weight` (of that prediction) first, with `debiased`
    (also) by `debiased_weight` (eps only: a ValueError for v, see DEBIASED_V_REFUSED), and by `weights` [B] when
    given (DreamBooth's prior preservation, `dreambooth.loss_weights`).

    eps_fn(x_t, t, ctx) -> the U-Net's output (eps or v); z0, noise [B, h, w, C]; t int32 [B]; ctx [B, S, d]."""
    if _check_prediction(prediction) == "v" and debiased:
        raise ValueError(DEBIASED_V_REFUSED)
    x_t = q_sample(schedule, z0, t, noise if x_noise is None else x_noise)
    pred = eps_fn(x_t, t, ctx).astype(jnp.float32)
    target = noise.astype(jnp.float32) if prediction == "eps" else velocity(schedule, z0, t, noise)
    per_example = jnp.mean(jnp.square(target - pred), axis=tuple(range(1, pred.ndim)))  # [B]
    if snr_gamma:
        per_example = per_example * min_snr_weight(schedule, t, snr_gamma, prediction)
    if debiased:
        per_example = per_example * debiased_weight(schedule, t)
    if weights is not None:
        per_example = per_example * weights.astype(jnp.float32)
    return jnp.mean(per_example)
