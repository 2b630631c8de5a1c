"""Which attention kernel `attention(impl="auto")` picks: cuDNN's head-dim limit per GPU generation, and a
fall-back to XLA that warns instead of passing silently (checked on the CPU by making cuDNN look eligible)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.bench import fused_attention_calls
from ldm_jax.models import attention as attn


@pytest.mark.parametrize("cc, limit", [("9.0", 256), ("10.0", 256), ("8.0", 128), (None, 128)])
def test_cudnn_head_dim_limit_follows_the_compute_capability(monkeypatch, cc, limit):
    dev = types.SimpleNamespace() if cc is None else types.SimpleNamespace(compute_capability=cc)
    monkeypatch.setattr(attn.jax, "devices", lambda: [dev])
    assert attn._max_cudnn_head_dim() == limit


def test_sd1_head_of_160_is_eligible_on_hopper_only(monkeypatch):
    monkeypatch.setattr(attn.jax, "default_backend", lambda: "gpu")
    q = jnp.zeros((1, 256, 8, 160), jnp.bfloat16)  # SD 1.x, 16x16 level: 1280 channels / 8 heads
    for cc, ok in (("9.0", True), ("8.0", False)):
        monkeypatch.setattr(attn.jax, "devices", lambda cc=cc: [types.SimpleNamespace(compute_capability=cc)])
        assert attn._cudnn_ok(q, q) is ok
    assert not attn._cudnn_ok(q.astype(jnp.float32), q)  # fp32 never goes to cuDNN


def test_auto_falls_back_to_xla_with_a_warning(monkeypatch):
    monkeypatch.setattr(attn, "_cudnn_ok", lambda q, k: True)  # on the CPU cuDNN then rejects at trace time
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 16, 2, 8)), jnp.bfloat16) for _ in range(3))
    with pytest.warns(UserWarning, match="cuDNN attention rejected"):
        got = attn.attention(q, k, v, scale=8**-0.5, impl="auto")
    want = attn.attention(q, k, v, scale=8**-0.5, impl="xla")
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_fused_attention_census_counts_cudnn_custom_calls():
    compiled = jax.jit(lambda q: attn.attention(q, q, q, scale=1.0)).lower(jnp.zeros((1, 4, 1, 8))).compile()
    assert fused_attention_calls(compiled) == 0  # XLA attention on the CPU
    fake = types.SimpleNamespace(as_text=lambda: 'a custom_call_target="__cudnn$fmhaSoftmax" b '
                                                  'custom_call_target="__cudnn$fmhaSoftmax" c')
    assert fused_attention_calls(fake) == 2
