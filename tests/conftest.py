"""Shared test set-up: fp32 parity needs full-precision matmuls on CPU."""

import jax

jax.config.update("jax_default_matmul_precision", "highest")
