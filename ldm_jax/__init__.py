"""ldm-jax: Stable Diffusion (latent diffusion, Rombach et al. 2022) in JAX/Flax.

    import ldm_jax
    sd = ldm_jax.load("v1-5-pruned-emaonly.safetensors")
"""

__version__ = "0.1.0"

from ldm_jax.configs import ModelConfig, preset  # noqa: E402
from ldm_jax.loading import load  # noqa: E402
from ldm_jax.stable_diffusion import StableDiffusion  # noqa: E402

__all__ = ["load", "StableDiffusion", "ModelConfig", "preset", "__version__"]
