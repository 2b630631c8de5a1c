"""Training the KL autoencoder (the first stage of latent diffusion) from scratch.

Rombach et al. 2022 §3 train the autoencoder with a reconstruction loss, a perceptual (LPIPS) loss, a patch
discriminator and a small KL penalty towards N(0, I) (CompVis `ldm/modules/losses/contperceptual.py`). LPIPS and
the discriminator need networks we cannot ship or download, so this trainer keeps the parts that do not:

    L = |x - D(z)|_1 + lambda_2 |x - D(z)|_2^2 + lambda_kl KL(q(z|x) || N(0, I)),   z ~ q(z|x) = N(mu, sigma^2)

which is enough for flat-coloured images such as `ldm_jax.data.shapes`. The optimiser and state are the U-Net
trainer's (`state.py`: AdamW, warmup + cosine, clipping). `latent_scale` is 1 / std of the posterior means, the
rule that gave SD its 0.18215, so the diffusion model sees unit-variance latents.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.configs import ModelConfig
from ldm_jax.models.autoencoder import DiagonalGaussian
from ldm_jax.models.build import modules, random_params
from ldm_jax.train.state import OptimConfig, apply_gradients, init_state


def vae_loss(module, params, images, key, *, kl_weight: float, l2_weight: float):
    """images [B, H, W, 3] in [-1, 1] -> (loss, {"l1", "l2", "kl"})."""
    post = DiagonalGaussian(module.apply({"params": params}, images, method="encode"))
    rec = module.apply({"params": params}, post.sample(key), method="decode")
    l1 = jnp.abs(images - rec).mean()
    l2 = jnp.square(images - rec).mean()
    kl = 0.5 * jnp.sum(jnp.square(post.mean) + jnp.exp(post.logvar) - 1.0 - post.logvar, axis=(1, 2, 3)).mean()
    return l1 + l2_weight * l2 + kl_weight * kl, {"l1": l1, "l2": l2, "kl": kl}


def make_vae_step(config: ModelConfig, optim: OptimConfig, *, kl_weight: float = 1e-6, l2_weight: float = 1.0):
    module = modules(config)["vae"]

    def step(state, images, key):
        grad_fn = jax.value_and_grad(lambda p: vae_loss(module, p, images, key, kl_weight=kl_weight,
                                                        l2_weight=l2_weight), has_aux=True)
        (loss, parts), grads = grad_fn(state.params)
        state, opt_metrics = apply_gradients(state, grads, optim)
        return state, {"loss": loss, **parts, **opt_metrics}

    return jax.jit(step, donate_argnums=0)


def latent_scale(config: ModelConfig, params, images: np.ndarray, batch: int = 64) -> float:
    """1 / std of the posterior means over `images` (the scaling factor of the latent space)."""
    module = modules(config)["vae"]
    encode = jax.jit(lambda p, x: DiagonalGaussian(module.apply({"params": p}, x, method="encode")).mean)
    means = [np.asarray(encode(params, images[i:i + batch])) for i in range(0, len(images), batch)]
    return float(1.0 / np.concatenate(means).std())


def train_autoencoder(config: ModelConfig, images: np.ndarray, *, steps: int, batch_size: int = 32,
                      lr: float = 1e-3, seed: int = 0, kl_weight: float = 1e-6, log=print, log_every: int = 100):
    """Train the autoencoder of `config` on images [N, H, W, 3] in [-1, 1] (held in memory).
    Returns (params, final metrics). Batches are drawn with a seeded permutation per epoch."""
    optim = OptimConfig(lr=lr, warmup=min(200, steps // 10), total_steps=steps, min_lr_ratio=0.1,
                        weight_decay=0.0, ema_decay=0.0, ema_warmup=False)
    params = jax.device_put(random_params(config, seed, components=("vae",))["vae"])
    state = init_state(params, optim)
    step_fn = make_vae_step(config, optim, kl_weight=kl_weight)
    n = len(images)
    key = jax.random.key(seed)
    order, pos, epoch = np.random.default_rng([seed, 0]).permutation(n), 0, 0
    t0, metrics = time.perf_counter(), {}
    for i in range(steps):
        if pos + batch_size > n:
            epoch += 1
            order, pos = np.random.default_rng([seed, epoch]).permutation(n), 0
        batch = jax.device_put(images[order[pos:pos + batch_size]])
        pos += batch_size
        state, metrics = step_fn(state, batch, jax.random.fold_in(key, i))
        if (i + 1) % log_every == 0 or i + 1 == steps:
            m = {k: float(v) for k, v in metrics.items()}
            log(f"vae step {i + 1}/{steps}  loss {m['loss']:.4f}  l1 {m['l1']:.4f}  kl {m['kl']:.1f}  "
                f"{(i + 1) / (time.perf_counter() - t0):.2f} steps/s")
    return state.params, {k: float(v) for k, v in metrics.items()}
