"""txt2img, img2img and inpaint as single compiled programs, data-parallel over all devices and hosts."""

from ldm_jax.pipelines.generate import Timings, img2img, inpaint, txt2img
from ldm_jax.pipelines.refine import base_and_refiner

__all__ = ["txt2img", "img2img", "inpaint", "base_and_refiner", "Timings"]
