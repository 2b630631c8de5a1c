"""The loss weightings against their formulas in float64 numpy: min-SNR-gamma (`ldm-jax train --snr-gamma`, Hang et
al. 2023) and 1/sqrt(SNR) (`--debiased-loss`, Yu et al. 2024); multi-resolution noise (`--multires-noise`, Whitaker
2023): its formula at the smallest size and its low frequencies; offset noise (`--noise-offset`) and input perturbation
(`--input-perturbation`, Ning et al. 2023): their draws, and the latter's loss and train step against float64 numpy."""

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




def _other_noise(keys):
    """[5, n, 256]: each example's white noise normal(k_noise) and the noise drawn from multires_noise's keys
    split(k_noise, 4)[i], i = 0..3 (`draw`'s k_noise: split(example key, 4)[1]), at the latent shape."""
    k_noise = jax.vmap(lambda k: jax.random.split(k, 4)[1])(keys)
    subkeys = [k_noise] + [jax.vmap(lambda k: jax.random.split(k, 4)[i])(k_noise) for i in range(4)]
    return np.stack([np.asarray(jax.vmap(lambda k: jax.random.normal(k, (8, 8, 4)))(k)).reshape(len(keys), -1)
                     for k in subkeys])

def test_input_perturbation_draws_eps_plus_gamma_xi_and_reaches_the_config(tmp_path):
    from ldm_jax.cli.cmd_train import train_config
    from ldm_jax.train.step import StepConfig

    args = ["train", "--preset", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "run")]
    assert train_config(build_parser().parse_args(args)).step.input_perturbation == 0.0
    parsed = build_parser().parse_args([*args, "--input-perturbation", "0.1"])
    assert train_config(parsed).step.input_perturbation == 0.1
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="input_perturbation must be in"):
            StepConfig(input_perturbation=bad)
    keys = jax.random.split(jax.random.PRNGKey(4), 256)
    off = L.draw(keys, (8, 8, 4), 1000, 0.1, noise_offset=0.1)
    on = L.draw(keys, (8, 8, 4), 1000, 0.1, noise_offset=0.1, input_perturbation=0.1)
    assert off.x_noise is None  # off: the program and every draw as before
    for name in ("t", "noise", "posterior_eps", "drop"):  # on: only x_noise is new
        assert np.array_equal(getattr(off, name), getattr(on, name)), name
    k_noise = jax.random.split(keys[0], 4)[1]
    xi = np.asarray(jax.random.normal(jax.random.fold_in(k_noise, L.XI_FOLD), (8, 8, 4)))
    assert np.allclose(on.x_noise[0], on.noise[0] + 0.1 * xi, rtol=0, atol=1e-6)  # on top of the offset noise
    xis = (np.asarray(on.x_noise) - np.asarray(on.noise)).reshape(256, -1) / 0.1  # [256, 256]
    assert abs(xis.std() - 1.0) < 0.02 and abs(xis.mean()) < 0.02  # N(0, 1)
    # fresh: uncorrelated with the white noise and every multires level's (a fold index 2 would equal level 2's)
    for other in _other_noise(keys):
        assert abs(np.corrcoef(xis.ravel(), other.ravel())[0, 1]) < 0.02


AB = np.cumprod(1.0 - np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2)


def _perturbed_loss_reference(z0, t, eps, x_noise, prediction, w=0.5):
    """mean || target - w x_t ||^2 in float64, x_t = sqrt(ab) z_0 + sqrt(1 - ab) (eps + gamma xi) (diffusers'
    add_noise(latents, new_noise, t)) and target eps or v = sqrt(ab) eps - sqrt(1 - ab) z_0 (get_velocity(latents,
    noise, t)): the unperturbed eps."""
    z0, eps, x_noise = (np.asarray(a, np.float64) for a in (z0, eps, x_noise))
    ab = AB[np.asarray(t)][:, None, None, None]
    x_t = np.sqrt(ab) * z0 + np.sqrt(1.0 - ab) * x_noise
    target = eps if prediction == "eps" else np.sqrt(ab) * eps - np.sqrt(1.0 - ab) * z0
    return ((target - w * x_t) ** 2).mean()


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_perturbed_loss_makes_z_t_from_eps_plus_gamma_xi_and_regresses_eps(prediction):
    rng = np.random.default_rng(6)
    z0, eps, xi = (rng.standard_normal((4, 2, 3, 4)).astype(np.float32) for _ in range(3))
    x_noise = eps + np.float32(0.1) * xi
    t, ctx = jnp.asarray([0, 300, 700, 999], jnp.int32), np.zeros((4, 1, 1), np.float32)
    eps_fn = lambda x, tt, c: 0.5 * x  # noqa: E731
    got = float(L.diffusion_loss(eps_fn, make_schedule(), z0, t, eps, ctx, prediction=prediction, x_noise=x_noise))
    want = _perturbed_loss_reference(z0, t, eps, x_noise, prediction)
    assert rel_err(got, want) <= 1e-5
    assert rel_err(got, _perturbed_loss_reference(z0, t, eps, eps, prediction)) > 1e-3  # xi reaches z_t


class _Fake:
    """A module whose apply is f(params, *inputs): a U-Net 0.5 x (nothing to compile), a text encoder of zeros."""

    def __init__(self, f):
        self.f = f

    def apply(self, variables, *args, **_):
        return self.f(variables["params"], *args)


def test_train_step_with_input_perturbation(monkeypatch):
    """The step (v-prediction, gamma 0.1, a fake U-Net w x_t: nothing to compile) against the float64 loss on the
    step's own draws (loss.py's key rule, compiled with the step): z_t from eps + gamma xi, v from eps alone."""
    import dataclasses

    from ldm_jax import configs
    from ldm_jax.train import step as step_module
    from ldm_jax.train.state import OptimConfig, init_state

    fake = {"unet": _Fake(lambda p, x, t, c: p["w"] * x), "vae": None,
            "text_encoder": _Fake(lambda p, ids: jnp.zeros(ids.shape + (8,)))}
    monkeypatch.setattr(step_module, "modules", lambda *a, **k: fake)
    cfg = configs.tiny()
    cfg = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, prediction="v"))
    step = step_module.make_train_step(cfg, OptimConfig(), step_module.StepConfig(caption_dropout=0.0,
                                                                                  input_perturbation=0.1))
    moments = np.random.default_rng(7).standard_normal((1, 2, 8, 8, 8)).astype(np.float32)

    @jax.jit
    def loss_and_draws(state, batch, key, frozen):
        keys = L.example_keys(jax.random.fold_in(jax.random.key(0), 0), jnp.arange(2))
        d = L.draw(keys, (8, 8, 4), 1000, 0.0, input_perturbation=0.1)
        z0 = L.posterior_sample(batch["moments"][0], d.posterior_eps, cfg.latent_scale)
        return step(state, batch, key, frozen)[1]["loss"], z0, d

    frozen = {"text_encoder": {}, "uncond_ids": np.zeros((1, 3), np.int32)}
    loss, z0, d = loss_and_draws(init_state({"w": jnp.float32(0.5)}, OptimConfig()),
                                 {"moments": moments, "ctx": np.zeros((1, 2, 3, 8), np.float32)},
                                 step_module.key_data(0), frozen)
    assert rel_err(float(loss), _perturbed_loss_reference(z0, d.t, d.noise, d.x_noise, "v")) <= 1e-5
