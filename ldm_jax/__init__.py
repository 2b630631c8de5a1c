"""ldm-jax: Stable Diffusion (latent diffusion, Rombach et al. 2022) in JAX/Flax."""

__version__ = "0.1.0"
