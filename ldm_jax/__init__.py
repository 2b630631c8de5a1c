"""ldm-jax: Stable Diffusion (latent diffusion, Rombach et al. 2022) in JAX/Flax.

    import ldm_jax
    sd = ldm_jax.load("v1-5-pruned-emaonly.safetensors")
    images = ldm_jax.txt2img(sd, ["a photo of a cat"], steps=50, seed=0)   # uint8 [1, 512, 512, 3]

Public names are imported lazily (PEP 562), so `import ldm_jax` is cheap and `convert` can import
`ldm_jax.configs` without a cycle.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load": "ldm_jax.loading",
    "StableDiffusion": "ldm_jax.stable_diffusion",
    "ModelConfig": "ldm_jax.configs",
    "preset": "ldm_jax.configs",
    "txt2img": "ldm_jax.pipelines",
    "img2img": "ldm_jax.pipelines",
    "inpaint": "ldm_jax.pipelines",
    "base_and_refiner": "ldm_jax.pipelines",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ldm_jax' has no attribute {name!r}")


def __dir__():
    return __all__
