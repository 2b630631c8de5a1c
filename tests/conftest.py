"""Shared test set-up: fp32 parity needs full-precision matmuls on CPU; the stored-program cache is off (tests
count compiles, and the user cache directory outlives a test run); tests/test_program_cache.py turns it on."""

import os

import jax

os.environ.setdefault("LDM_JAX_NO_PROGRAM_CACHE", "1")

jax.config.update("jax_default_matmul_precision", "highest")
