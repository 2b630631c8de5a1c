"""Build the Flax modules of a ModelConfig (U-Net, VAE, text encoder; SDXL's second text encoder), their parameter
shapes, or random parameters."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.configs import ModelConfig
from ldm_jax.models.autoencoder import Autoencoder
from ldm_jax.models.clip_text import CLIPTextModel
from ldm_jax.models.shape_cache import cached_shapes
from ldm_jax.models.unet import UNetModel

COMPONENTS = ("unet", "vae", "text_encoder")  # every model's; SDXL adds "text_encoder_2"


def components_of(config: ModelConfig) -> tuple[str, ...]:
    """The parameter trees of a model of this config: COMPONENTS, and "text_encoder_2" for SDXL."""
    return COMPONENTS + (("text_encoder_2",) if config.text_2 is not None else ())


def modules(config: ModelConfig, dtype=jnp.float32, attention_impl: str = "auto", remat: bool = False):
    """{"unet": UNetModel, "vae": Autoencoder, "text_encoder": CLIPTextModel[, "text_encoder_2": CLIPTextModel]}
    in compute dtype `dtype`. SDXL's VAE overflows in float16 (activations past 65504: black or NaN images; diffusers
    upcasts it, `force_upcast`), so with float16 it computes in float32; bfloat16 has float32's range."""
    sdxl_vae = config.is_sdxl or config.is_sdxl_refiner
    vae_dtype = jnp.float32 if sdxl_vae and jnp.dtype(dtype) == jnp.float16 else dtype
    mods = {
        "unet": UNetModel(config.unet, dtype=dtype, attention_impl=attention_impl, remat=remat),
        "vae": Autoencoder(config.vae, dtype=vae_dtype, attention_impl=attention_impl),
        "text_encoder": CLIPTextModel(config.text, dtype=dtype),
    }
    if config.text_2 is not None:
        mods["text_encoder_2"] = CLIPTextModel(config.text_2, dtype=dtype)
    return mods


def _init_inputs(config: ModelConfig):
    f = config.vae.downsample_factor
    u = config.unet
    y = (jnp.zeros((1, u.adm_in_channels)),) if u.adm_in_channels else ()
    inputs = {
        "unet": (jnp.zeros((1, 8, 8, u.in_channels)), jnp.zeros((1,), jnp.int32),
                 jnp.zeros((1, config.text.max_length, u.d_cond))) + y,
        "vae": (jnp.zeros((1, 2 * f, 2 * f, config.vae.in_channels)),),
        "text_encoder": (jnp.zeros((1, config.text.max_length), jnp.int32),),
    }
    if config.text_2 is not None:
        inputs["text_encoder_2"] = (jnp.zeros((1, config.text_2.max_length), jnp.int32),)
    return inputs


def init_params(config: ModelConfig, key, components=None):
    """Random parameters (Flax default initialisers), fp32: {"unet": ..., "vae": ..., "text_encoder": ...}."""
    mods, inputs, every = modules(config), _init_inputs(config), components_of(config)
    keys = dict(zip(every, jax.random.split(key, len(every))))
    return {c: jax.jit(mods[c].init)(keys[c], *inputs[c])["params"] for c in components or every}


@functools.lru_cache(maxsize=None)
def abstract_params(config: ModelConfig, components=None):
    """Parameter shapes only (jax.ShapeDtypeStruct leaves), computed without running the model (cached per
    config, in memory and on disk (`shape_cache`): tracing the full-size model takes seconds; callers must not
    mutate the result)."""
    components = tuple(components or components_of(config))

    def compute():
        mods, inputs = modules(config), _init_inputs(config)
        return {c: jax.eval_shape(mods[c].init, jax.random.key(0), *inputs[c])["params"] for c in components}

    return cached_shapes(config.to_json(), components, compute)


def random_params(config: ModelConfig, seed: int = 0, components=None, perturb: float = 0.05):
    """Random fp32 numpy parameters without compiling anything (fast even at full size): kernels and
    embeddings N(0, 1/fan_in) (LeCun), norm scales 1 and biases 0, then every tensor perturbed by
    `perturb` so that no scale, bias or zero-init is trivial. For benchmarks, demos and random checkpoints.

    A perturbed Gaussian kernel w + s n (w ~ N(0, 1/fan_in), n ~ N(0, 1), s = perturb * max(E|w|, 0.02)) is
    itself Gaussian, so it is drawn once with std sqrt(1/fan_in + s^2), in place (E|w| = sqrt(2 / (pi fan_in))):
    one normal per weight instead of two (SD 1.x, 1.07e9 weights: 18 s instead of 30 s on 2 cores)."""
    rng = np.random.default_rng(seed)
    shapes = abstract_params(config, components)

    def leaf(path, s):
        name = path[-1].key
        if name in ("kernel", "embedding"):
            fan_in = int(np.prod(s.shape[:-1])) if name == "kernel" else s.shape[-1]
            std = 1.0 / np.sqrt(fan_in)
            noise = perturb * max(std * np.sqrt(2.0 / np.pi), 0.02)
            w = rng.standard_normal(s.shape, np.float32)
            w *= np.float32(np.sqrt(std**2 + noise**2))
            return w
        w = np.full(s.shape, 1.0 if name == "scale" else 0.0, np.float32)
        return w + np.float32(perturb * max(float(np.abs(w).mean()), 0.02)) * rng.standard_normal(s.shape, np.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)
