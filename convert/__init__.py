"""CompVis checkpoints (.ckpt / .safetensors) <-> Flax parameter trees, without torch."""
