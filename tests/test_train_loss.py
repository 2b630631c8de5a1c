"""Min-SNR-gamma weighting (`ldm-jax train --snr-gamma`, Hang et al. 2023) against the formula in float64 numpy."""

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


def test_cli_flag_reaches_the_step_config(tmp_path):
    from ldm_jax.cli.cmd_train import train_config
    from ldm_jax.train.step import StepConfig

    args = ["train", "--preset", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "run")]
    assert train_config(build_parser().parse_args(args)).step.snr_gamma is None
    assert train_config(build_parser().parse_args([*args, "--snr-gamma", "5"])).step.snr_gamma == 5.0
    with pytest.raises(ValueError, match="snr_gamma"):
        StepConfig(snr_gamma=0.0)
