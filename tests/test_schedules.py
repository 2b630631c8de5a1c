"""Noise schedule vs labml's LatentDiffusion formula and an independent float64 recomputation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.configs import ScheduleConfig
from ldm_jax.schedules import Schedule, make_schedule, q_sample, sigma_to_t, t_to_sigma

jax.config.update("jax_default_matmul_precision", "highest")


def test_matches_labml_latent_diffusion():
    torch = pytest.importorskip("torch")
    ld = pytest.importorskip("labml_nn.diffusion.stable_diffusion.latent_diffusion")
    model = ld.LatentDiffusion(torch.nn.Identity(), torch.nn.Identity(), torch.nn.Identity(),
                               latent_scaling_factor=0.18215, n_steps=1000, linear_start=0.00085, linear_end=0.012)
    s = make_schedule(ScheduleConfig())
    assert s.betas.dtype == jnp.float32 and s.alphas_cumprod.shape == (1000,)
    np.testing.assert_allclose(np.asarray(s.betas), model.beta.detach().numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(s.alpha_bar), model.alpha_bar.detach().numpy(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("kind", ["scaled_linear", "linear"])
def test_float64_recomputation(kind):
    cfg = ScheduleConfig(kind=kind, beta_start=0.0001 if kind == "linear" else 0.00085,
                         beta_end=0.02 if kind == "linear" else 0.012)
    s = make_schedule(cfg)
    T = 1000
    if kind == "scaled_linear":
        beta = np.array([(np.sqrt(cfg.beta_start) + i * (np.sqrt(cfg.beta_end) - np.sqrt(cfg.beta_start)) / (T - 1))
                         ** 2 for i in range(T)])
    else:
        beta = np.array([cfg.beta_start + i * (cfg.beta_end - cfg.beta_start) / (T - 1) for i in range(T)])
    ab = np.ones(T)
    acc = 1.0
    for i in range(T):
        acc *= 1.0 - beta[i]
        ab[i] = acc
    for got, want in [(s.betas, beta), (s.alphas, 1 - beta), (s.alphas_cumprod, ab),
                      (s.sqrt_alphas_cumprod, np.sqrt(ab)), (s.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - ab)),
                      (s.sigmas, np.sqrt((1 - ab) / ab))]:
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=1e-7)
    if kind == "scaled_linear":  # SD 1.x facts
        assert abs(float(s.sigma_max) - 14.6146) < 1e-3 and abs(float(s.sigma_min) - 0.029168) < 1e-5


def test_bad_kind_and_pytree():
    with pytest.raises(ValueError, match="unknown schedule kind"):
        make_schedule(ScheduleConfig(kind="cosine-ish"))
    s = make_schedule()
    leaves, tree = jax.tree_util.tree_flatten(s)
    assert len(leaves) == 7 and jax.tree_util.tree_unflatten(tree, leaves).n_steps == 1000
    # usable inside jit, both built inside and passed in
    f = jax.jit(lambda sch, t: sch.alphas_cumprod[t] + make_schedule().betas[t])
    assert np.isfinite(float(f(s, 3)))
    assert isinstance(jax.jit(lambda sch: sch)(s), Schedule)


def test_q_sample():
    s = make_schedule()
    rng = np.random.default_rng(0)
    x0, noise = rng.normal(size=(2, 4, 4, 3)).astype(np.float32), rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    t = np.array([0, 999])
    ab = np.asarray(s.alphas_cumprod, np.float64)[t][:, None, None, None]
    want = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
    np.testing.assert_allclose(np.asarray(q_sample(s, x0, jnp.asarray(t), noise)), want, rtol=1e-6, atol=1e-6)


def _kdiff_sigma_to_t(log_sigmas, sigma):
    """k-diffusion DiscreteSchedule.sigma_to_t (unquantized), transcribed to numpy float64."""
    log_sigma = np.log(sigma)
    dists = log_sigma - log_sigmas[:, None]
    low_idx = np.minimum(np.argmax(np.cumsum(dists >= 0, axis=0), axis=0), len(log_sigmas) - 2)
    low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * (low_idx + 1)


def test_sigma_to_t():
    s = make_schedule()
    ls = np.asarray(s.log_sigmas, np.float64)
    sig = np.exp(np.concatenate([np.linspace(ls[0] - 1, ls[-1] + 1, 257), (ls[:-1] + ls[1:]) / 2]))
    got = np.asarray(sigma_to_t(s, jnp.asarray(sig, jnp.float32)))
    np.testing.assert_allclose(got, _kdiff_sigma_to_t(ls, sig), atol=2e-3)
    np.testing.assert_allclose(got[257:], np.arange(999) + 0.5, atol=2e-3)  # geometric midpoints
    assert got[0] == 0 and got[256] == 999  # clamped outside the table
    np.testing.assert_allclose(np.asarray(sigma_to_t(s, s.sigmas)), np.arange(1000), atol=1e-3)
    np.testing.assert_allclose(np.asarray(t_to_sigma(s, jnp.asarray(got[257:]))), sig[257:], rtol=1e-5)
