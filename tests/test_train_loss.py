"""The loss weightings against their formulas in float64 numpy: min-SNR-gamma (`ldm-jax train --snr-gamma`, Hang et
al. 2023) and 1/sqrt(SNR) (`--debiased-loss`, Yu et al. 2024); multi-resolution noise (`--multires-noise`, Whitaker
2023): its formula at the smallest size and its low frequencies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.cli.main import build_parser
from ldm_jax.schedules import make_schedule
from ldm_jax.train import loss as L
from tests.parity import rel_err


def _snr_reference(t: np.ndarray) -> np.ndarray:
    """SNR_t = alpha_bar_t / (1 - alpha_bar_t) of SD's scaled-linear schedule, from the betas in float64."""
    beta = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    ab = np.cumprod(1.0 - beta)[t]
    return ab / (1.0 - ab)


def test_min_snr_weight_matches_the_formula():
    sched = make_schedule()
    t = np.array([0, 10, 100, 250, 500, 999])
    snr = _snr_reference(t)
    want = np.minimum(snr, 5.0) / snr
    got = np.asarray(L.min_snr_weight(sched, jnp.asarray(t, jnp.int32), 5.0))
    assert rel_err(got, want) <= 1e-5
    assert got[0] < 0.01 and got[-1] == 1.0  # nearly clean steps down-weighted, noisy ones untouched


def test_weighted_loss_is_the_weighted_mean_of_per_example_errors():
    sched = make_schedule()
    rng = np.random.default_rng(0)
    z0, noise = (rng.standard_normal((4, 2, 3, 4)).astype(np.float32) for _ in range(2))
    t = np.array([5, 300, 700, 990], np.int32)
    ctx = np.zeros((4, 1, 1), np.float32)
    eps_fn = lambda x, tt, c: 0.5 * x  # noqa: E731  (any deterministic function of x_t)
    ab = np.cumprod(1.0 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)[t][:, None, None, None]
    x_t = np.sqrt(ab) * z0 + np.sqrt(1.0 - ab) * noise
    per_example = ((noise - 0.5 * x_t) ** 2).mean(axis=(1, 2, 3))
    snr = _snr_reference(t)
    plain = float(L.diffusion_loss(eps_fn, sched, z0, t, noise, ctx))
    weighted = float(L.diffusion_loss(eps_fn, sched, z0, t, noise, ctx, snr_gamma=5.0))
    assert rel_err(plain, per_example.mean()) <= 1e-5
    assert rel_err(weighted, (per_example * np.minimum(snr, 5.0) / snr).mean()) <= 1e-5
    assert weighted < plain


def test_debiased_weight_is_one_over_sqrt_snr_and_combines_with_min_snr():
    sched = make_schedule()
    t = np.array([0, 250, 500, 999])
    snr = _snr_reference(t)
    got = np.asarray(L.debiased_weight(sched, jnp.asarray(t, jnp.int32)))
    assert rel_err(got, 1.0 / np.sqrt(np.minimum(snr, 1000.0))) <= 1e-5
    assert got[-1] > 10.0 and got[0] < 0.05  # the noisiest step counts most
    rng = np.random.default_rng(1)
    z0, noise = (rng.standard_normal((4, 2, 3, 4)).astype(np.float32) for _ in range(2))
    eps_fn, ctx, tt = (lambda x, _, c: 0.5 * x), np.zeros((4, 1, 1), np.float32), jnp.asarray(t, jnp.int32)
    per_example = [float(L.diffusion_loss(eps_fn, sched, z0[i:i + 1], tt[i:i + 1], noise[i:i + 1], ctx[:1]))
                   for i in range(4)]
    both = float(L.diffusion_loss(eps_fn, sched, z0, tt, noise, ctx, snr_gamma=5.0, debiased=True))
    assert rel_err(both, np.mean(np.array(per_example) * np.minimum(snr, 5.0) / snr * got)) <= 1e-5


def test_cli_flag_reaches_the_step_config(tmp_path):
    from ldm_jax.cli.cmd_train import train_config
    from ldm_jax.train.step import StepConfig

    args = ["train", "--preset", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "run")]
    assert train_config(build_parser().parse_args(args)).step.snr_gamma is None
    assert train_config(build_parser().parse_args([*args, "--snr-gamma", "5"])).step.snr_gamma == 5.0
    assert not train_config(build_parser().parse_args(args)).step.debiased_loss
    assert train_config(build_parser().parse_args([*args, "--debiased-loss"])).step.debiased_loss
    with pytest.raises(ValueError, match="snr_gamma"):
        StepConfig(snr_gamma=0.0)


def test_multires_noise_at_2x2_is_white_plus_an_offset_rescaled():
    key, d = jax.random.PRNGKey(3), 0.8
    got = np.asarray(L.multires_noise(key, (2, 2, 4), d), np.float64)
    k0, k1 = jax.random.split(key, 2)  # one coarse level: 1x1 per channel, resized up to a constant
    want = np.asarray(jax.random.normal(k0, (2, 2, 4)), np.float64) + d * np.asarray(jax.random.normal(k1, (1, 1, 4)))
    want /= want.std()
    assert rel_err(got, want) <= 1e-5


def test_multires_noise_is_unit_variance_with_much_more_coarse_energy():
    keys = jax.random.split(jax.random.PRNGKey(0), 512)
    multi = np.asarray(jax.vmap(lambda k: L.multires_noise(k, (16, 16, 4), 0.8))(keys))
    white = np.asarray(jax.vmap(lambda k: jax.random.normal(k, (16, 16, 4)))(keys))
    assert np.allclose(multi.reshape(512, -1).std(axis=1), 1.0, atol=1e-5)
    assert np.array_equal(multi[0], np.asarray(L.multires_noise(keys[0], (16, 16, 4), 0.8)))  # a function of the key

    def top_minus_bottom(x):  # what a model could read the background's layout from
        return (x[:, :8].mean(axis=(1, 2)) - x[:, 8:].mean(axis=(1, 2))).std()

    assert top_minus_bottom(multi) > 2.0 * top_minus_bottom(white)  # ~3x (0.375 vs 0.125)


def test_multires_flag_reaches_the_draws(tmp_path):
    from ldm_jax.cli.cmd_train import train_config
    from ldm_jax.train.step import StepConfig

    args = ["train", "--preset", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "run")]
    assert train_config(build_parser().parse_args(args)).step.multires_noise == 0.0
    assert train_config(build_parser().parse_args([*args, "--multires-noise", "0.8"])).step.multires_noise == 0.8
    with pytest.raises(ValueError, match="multires_noise"):
        StepConfig(multires_noise=1.0)
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    plain, multi = L.draw(keys, (8, 8, 4), 1000, 0.1), L.draw(keys, (8, 8, 4), 1000, 0.1, multires_discount=0.8)
    assert np.array_equal(plain.t, multi.t) and np.array_equal(plain.drop, multi.drop)  # only the noise changes
    k_noise = jax.random.split(keys[0], 4)[1]
    assert np.array_equal(plain.noise[0], jax.random.normal(k_noise, (8, 8, 4)))  # white noise as before
    assert np.array_equal(multi.noise[0], L.multires_noise(k_noise, (8, 8, 4), 0.8))


def test_noise_offset_adds_one_value_per_channel_and_reaches_the_config(tmp_path):
    from ldm_jax.cli.cmd_train import train_config
    from ldm_jax.train.step import StepConfig

    args = ["train", "--preset", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "run")]
    assert train_config(build_parser().parse_args(args)).step.noise_offset == 0.0
    assert train_config(build_parser().parse_args([*args, "--noise-offset", "0.1"])).step.noise_offset == 0.1
    with pytest.raises(ValueError, match="noise_offset"):
        StepConfig(noise_offset=-0.1)
    keys = jax.random.split(jax.random.PRNGKey(2), 256)
    plain, offset = L.draw(keys, (8, 8, 4), 1000, 0.1), L.draw(keys, (8, 8, 4), 1000, 0.1, noise_offset=0.5)
    assert np.array_equal(plain.t, offset.t) and np.array_equal(plain.posterior_eps, offset.posterior_eps)
    shift = np.asarray(offset.noise - plain.noise)  # [256, 8, 8, 4]: one value per example and channel
    assert np.allclose(shift, shift[:, :1, :1, :], atol=1e-6)
    k_noise = jax.random.split(keys[0], 4)[1]
    want = 0.5 * np.asarray(jax.random.normal(jax.random.fold_in(k_noise, 1), (1, 1, 4)))
    assert np.allclose(shift[0], want, atol=1e-6)
    assert 0.4 < shift[:, 0, 0, :].std() < 0.6  # 0.5 x N(0, 1)
