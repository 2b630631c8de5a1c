"""v-prediction models (`ScheduleConfig.prediction = "v"`, SD 2.x 768-v; Salimans & Ho 2022): the U-Net outputs
v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0, the pipelines hand the samplers eps = sqrt(ab_t) v + sqrt(1 - ab_t) x_t
(`program.eps_from_output`, with the alpha_bar of the integer t the U-Net gets), training regresses v.

(a) Whole sampler chains against diffusers' schedulers with prediction_type="v_prediction", on the toy model and
    injected noise of test_samplers_diffusers.py (its output read as v), relative max error <= TOL = 2e-5:
    DDIM and DDPM (measured <= 1.3e-6) and euler_a on grids of integer t (S - 1 divides T - 1; <= 5e-6) equal
    diffusers' own v path. Two deliberate differences, each checked exactly against diffusers fed our convention
    (an epsilon scheduler whose torch-side model converts v with diffusers' own float32 alpha_bar at the U-Net's t):
    - dpmpp_2m, and euler_a off integer grids: we convert with alpha_bar at the rounded t the U-Net is told (so a
      v-model is exactly its eps twin); diffusers (and k-diffusion) convert with the continuous sigma. Measured
      1e-4 .. 2.5e-4 apart from diffusers' v path, checked <= 1e-3.
    - plms: PLMS combines eps, each converted at its own (x, t), as the eps twin would; diffusers' PNDMScheduler
      combines the raw v outputs of different steps and converts the mix at the current (x, t) (0.15 apart at 10
      steps, 0.03 at 50): not followed. (Stability's SD 2 plms.py does not convert v at all.)
(b) A v-model made analytically from an eps-model (v = sqrt(ab) eps - sqrt(1 - ab) x0_hat, in float64-derived
    tables of its own) gives the eps-model's samples: every sampler, and the pipelines (txt2img with guidance 7.5,
    so guiding v equals guiding eps; img2img; mask-blend inpaint; the 9-channel inpainting U-Net).
(c) The training loss for v against float64 numpy and against diffusers' get_velocity / compute_snr formula;
    min-SNR-gamma weights for v; the debiased loss refused for v.
(d) eps configs: bit for bit the code before v-prediction (the old functions, copied here), pipeline and loss.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ldm_jax
from ldm_jax import configs, samplers as S
from ldm_jax.train import step as step_module
from ldm_jax.errors import UserError
from ldm_jax.models.build import random_params
from ldm_jax.pipelines import program
from ldm_jax.pipelines.program import _interleave, _split_pairs, eps_from_output
from ldm_jax.schedules import q_sample
from ldm_jax.stable_diffusion import StableDiffusion
from ldm_jax.train import loss as L
from ldm_jax.train.state import OptimConfig, init_state
from ldm_jax.train.step import StepConfig, key_data, make_train_step
from tests import test_samplers_diffusers as T
from tests.test_samplers_diffusers import KEYS, SCH, SD, X_T, assert_close, diffusers_chain, inject_noise

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

V = dict(prediction_type="v_prediction")
AB = np.cumprod(1.0 - np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2)  # float64 alpha_bar
SQRT_AB, SQRT_1MAB = (jnp.asarray(np.sqrt(a), jnp.float32) for a in (AB, 1.0 - AB))


def _col(v, t):
    return v[t].reshape(-1, 1, 1, 1)


def v_twin(eps, x, t):
    """The v-model made from an eps-model: x0_hat = (x - sqrt(1 - ab) eps) / sqrt(ab), v = sqrt(ab) eps -
    sqrt(1 - ab) x0_hat (our own tables, not schedules.py's)."""
    a, b = _col(SQRT_AB, t), _col(SQRT_1MAB, t)
    return a * eps - b * (x - b * eps) / a


def eps_of_toy_v(x, t):
    """Our convention over the toy model of test_samplers_diffusers.py read as a v-model."""
    return eps_from_output(SCH, "v", T.eps_jax(x, t), x, t)


def ours(name, eps_fn, steps, keys=None, **kw):
    return np.asarray(S.sample(name, eps_fn, jnp.asarray(X_T), SCH, keys, steps=steps, **kw))


def torch_our_convention(sched):
    """diffusers-side model: the toy v converted to eps at the (integer) t it is given, with diffusers' float32
    alphas_cumprod (an epsilon scheduler then runs our convention)."""
    def model(x, t):
        ab = sched.alphas_cumprod[int(round(t))]
        return ab**0.5 * T.eps_torch(x, t) + (1.0 - ab) ** 0.5 * x
    return model


def chain_with(sched, steps, model, x_T, t_model=float):
    """`diffusers_chain` (txt2img) with another model."""
    sched.set_timesteps(steps)
    x = torch.from_numpy(x_T) * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(model(sched.scale_model_input(x, t), t_model(float(t))), t, x).prev_sample
    return x.numpy()


# ------------------------------------------------------------------------- (a) chains against diffusers


@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_and_ddpm_match_diffusers_v_prediction(steps, monkeypatch):
    ddim = diffusers.DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                                   timestep_spacing="leading", **V)
    assert_close(ours("ddim", eps_of_toy_v, steps), diffusers_chain(ddim, steps, X_T))
    if steps != 10:
        return
    calls = inject_noise(monkeypatch, "scheduling_ddpm")
    ddpm = diffusers.DDPMScheduler(**SD, clip_sample=False, timestep_spacing="leading", steps_offset=0, **V)
    theirs = diffusers_chain(ddpm, steps, X_T)
    assert len(calls) == steps - 1
    assert_close(ours("ddpm", eps_of_toy_v, steps, KEYS), theirs)


@pytest.mark.parametrize("steps", [10, 28])
def test_euler_ancestral_matches_diffusers_v_prediction_on_integer_grids(steps, monkeypatch):
    inject_noise(monkeypatch, "scheduling_euler_ancestral_discrete")
    sched = diffusers.EulerAncestralDiscreteScheduler(**SD, timestep_spacing="linspace", **V)
    assert_close(ours("euler_a", eps_of_toy_v, steps, KEYS), diffusers_chain(sched, steps, X_T))
    if steps == 10:  # eta 0: diffusers' EulerDiscreteScheduler
        assert_close(ours("euler_a", eps_of_toy_v, steps, eta=0.0),
                     diffusers_chain(diffusers.EulerDiscreteScheduler(**SD, **V), steps, X_T))


@pytest.mark.parametrize("name, steps", [("dpmpp_2m", 10), ("dpmpp_2m", 25), ("euler_a", 20)])
def test_k_samplers_convert_at_the_unets_t(name, steps, monkeypatch):
    """Exactly diffusers run with our convention; close to diffusers' own v path (continuous-sigma conversion)."""
    def make(**kw):
        if name == "dpmpp_2m":
            return T.dpm_sched(final_sigmas_type="zero", **kw), T.dpm_start(steps), float
        inject_noise(monkeypatch, "scheduling_euler_ancestral_discrete")
        return (diffusers.EulerAncestralDiscreteScheduler(**SD, timestep_spacing="linspace", **kw), X_T,
                lambda t: float(np.round(t)))

    got = ours(name, eps_of_toy_v, steps, KEYS if name == "euler_a" else None)
    sched, x_T, t_model = make()
    assert_close(got, chain_with(sched, steps, torch_our_convention(sched), x_T, t_model))
    sched, x_T, t_model = make(**V)
    assert_close(got, chain_with(sched, steps, T.eps_torch, x_T, t_model), tol=1e-3)


@pytest.mark.parametrize("steps", [10, 50])
def test_plms_is_plms_over_the_converted_eps(steps):
    sched = diffusers.PNDMScheduler(**SD, steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True,
                                    timestep_spacing="leading")
    assert_close(ours("plms", eps_of_toy_v, steps), chain_with(sched, steps, torch_our_convention(sched), X_T))


# ------------------------------------------------------------------------- (b) the v twin of an eps model


def eps_and_twin(x, t):
    """Row 0 follows the toy eps-model, row 1 its v twin converted back (rows are independent: one chain, one
    compile, for both)."""
    e = T.eps_jax(x, t)
    twin = eps_from_output(SCH, "v", v_twin(e, x, t), x, t)
    return jnp.where(jnp.arange(x.shape[0]).reshape(-1, 1, 1, 1) == 0, e, twin)


@pytest.mark.parametrize("name", sorted(S.SAMPLERS))
def test_every_sampler_gives_a_v_twin_the_eps_models_samples(name):
    two = lambda a: jnp.concatenate([jnp.asarray(a)] * 2)  # noqa: E731
    keys = two(KEYS)  # the same noise for both rows
    out = np.asarray(S.sample(name, eps_and_twin, two(X_T), SCH, keys, steps=10))
    assert_close(out[1:], out[:1])
    x0, noise = two(T.X0), two(T.NOISE)  # img2img's start and mask-blend inpainting
    known = S.Known(x0, two(np.array([1.0, 0.0, 1.0, 0.0], np.float32).reshape(T.SHAPE)), noise)
    x_T = S.noise_to_start(name, SCH, x0, noise, 10, 4)
    out = np.asarray(S.sample(name, eps_and_twin, x_T, SCH, keys, steps=10, start_step=4, known=known))
    assert_close(out[1:], out[:1])


class ToyUNet(StableDiffusion):
    """A StableDiffusion whose U-Net is closed-form: eps = 0.9 x + 0.3 sin(t / 100) + 2 mean(ctx) (+ 0.2 mask
    + 0.1 masked-image latents for a 9-channel U-Net), or its `v_twin` when the config predicts v; its text encoder
    is closed-form too (sin(ids k / 1000), k = 1..d). The VAE is the tiny model's. Cheap to compile."""

    def encode_text(self, params, ids):
        k = jnp.arange(1, self.config.unet.d_cond + 1, dtype=jnp.float32)
        return jnp.sin(jnp.asarray(ids, jnp.float32)[..., None] * k / 1000.0)

    def predict_noise(self, params, x, t, ctx):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x.shape[0],))
        lat = x[..., :4]
        eps = (0.9 * lat + 0.3 * jnp.sin(t.astype(jnp.float32) / 100.0).reshape(-1, 1, 1, 1)
               + 2.0 * jnp.mean(ctx, axis=(1, 2)).reshape(-1, 1, 1, 1))
        if x.shape[-1] == 9:
            eps = eps + 0.2 * x[..., 4:5] + 0.1 * x[..., 5:]
        return v_twin(eps, lat, t) if self.config.schedule.prediction == "v" else eps


def toy_config(prediction="eps", inpainting=False):
    cfg = configs.tiny()
    unet = dataclasses.replace(cfg.unet, in_channels=9 if inpainting else 4)
    return dataclasses.replace(cfg, unet=unet, schedule=dataclasses.replace(cfg.schedule, prediction=prediction))


def toy(prediction="eps", inpainting=False):
    cfg = toy_config(prediction, inpainting)
    return ToyUNet(cfg, {"vae": random_params(cfg, 5, components=("vae",))["vae"], "unet": {}, "text_encoder": {}})


INIT = np.random.default_rng(0).uniform(-1, 1, (16, 16, 3)).astype(np.float32)
MASK = np.zeros((16, 16), np.float32)
MASK[:, 8:] = 1.0


_EPS_RESULTS = {}


def request(sd, mode, sampler):
    kw = dict(steps=6, sampler=sampler, guidance_scale=7.5, seed=3, output="latents")
    prompts = ["a red circle", "a blue square"]
    if mode == "txt2img":
        return ldm_jax.txt2img(sd, prompts, height=16, width=16, **kw)
    if mode == "img2img":
        return ldm_jax.img2img(sd, prompts, INIT, strength=0.7, **kw)
    return ldm_jax.inpaint(sd, prompts, INIT, MASK, **kw)


def eps_result(mode, sampler, inpainting):
    """The eps toy model's result of a request (memoised: the bit-for-bit checks below reuse it)."""
    key = (mode, sampler, inpainting)
    if key not in _EPS_RESULTS:
        _EPS_RESULTS[key] = request(toy("eps", inpainting), mode, sampler)
    return _EPS_RESULTS[key]


PIPELINE_CASES = [("txt2img", "ddim", False), ("img2img", "dpmpp_2m", False), ("inpaint", "euler_a", True)]


@pytest.mark.parametrize("mode, sampler, inpainting", PIPELINE_CASES)
def test_pipelines_give_a_v_twin_the_eps_models_images(mode, sampler, inpainting):
    """Guidance 7.5 on v, then one conversion, equals guidance on eps (the affine conversion commutes with it)."""
    want = eps_result(mode, sampler, inpainting)
    got = request(toy("v", inpainting), mode, sampler)
    assert np.abs(want).max() > 0.5  # guidance 7.5 on a context term: a real signal
    assert_close(got, want)


# ------------------------------------------------------------------------- (c) training


def test_velocity_is_diffusers_get_velocity():
    rng = np.random.default_rng(2)
    z0, noise = (rng.standard_normal((5, 2, 3, 4)).astype(np.float32) for _ in range(2))
    t = np.array([0, 1, 300, 800, 999])
    want = diffusers.DDPMScheduler(**SD, **V).get_velocity(torch.from_numpy(z0), torch.from_numpy(noise),
                                                           torch.from_numpy(t)).numpy()
    assert_close(L.velocity(SCH, z0, jnp.asarray(t, jnp.int32), noise), want, tol=1e-6)


@pytest.mark.parametrize("gamma", [None, 5.0])
def test_v_loss_is_hand_computed_and_diffusers_formula(gamma):
    rng = np.random.default_rng(3)
    z0, noise = (rng.standard_normal((4, 2, 3, 4)).astype(np.float32) for _ in range(2))
    t = np.array([2, 300, 700, 995])
    ctx = np.zeros((4, 1, 1), np.float32)
    model = lambda x, tt, c: 0.5 * x  # noqa: E731
    got = float(L.diffusion_loss(model, SCH, z0, jnp.asarray(t, jnp.int32), noise, ctx, snr_gamma=gamma,
                                 prediction="v"))
    ab = AB[t][:, None, None, None]
    x_t = np.sqrt(ab) * z0 + np.sqrt(1 - ab) * noise
    per_example = ((np.sqrt(ab) * noise - np.sqrt(1 - ab) * z0 - 0.5 * x_t) ** 2).mean(axis=(1, 2, 3))
    snr = AB[t] / (1 - AB[t])
    weight = 1.0 if gamma is None else np.minimum(snr, gamma) / (snr + 1)
    assert abs(got - (per_example * weight).mean()) <= 1e-5 * abs(got)
    # diffusers' train_text_to_image.py, written out with its own scheduler and compute_snr
    from diffusers.training_utils import compute_snr

    sched, tt = diffusers.DDPMScheduler(**SD, **V), torch.from_numpy(t)
    noisy = sched.add_noise(torch.from_numpy(z0), torch.from_numpy(noise), tt)
    target = sched.get_velocity(torch.from_numpy(z0), torch.from_numpy(noise), tt)
    mse = torch.nn.functional.mse_loss(0.5 * noisy, target, reduction="none").mean(dim=[1, 2, 3])
    if gamma is not None:
        s = compute_snr(sched, tt)
        mse = mse * torch.stack([s, gamma * torch.ones_like(tt)], dim=1).min(dim=1)[0] / (s + 1)
    assert abs(got - float(mse.mean())) <= 2e-5 * abs(got)


def test_min_snr_v_weights():
    t = np.array([0, 100, 250, 500, 999])
    snr = AB[t] / (1 - AB[t])
    got = np.asarray(L.min_snr_weight(SCH, jnp.asarray(t, jnp.int32), 5.0, "v"))
    np.testing.assert_allclose(got, np.minimum(snr, 5.0) / (snr + 1), rtol=1e-4)  # fp32 1 - ab_0: 2.6e-5
    # t = 0: exactly 5 (1 - ab_0)
    np.testing.assert_allclose(got, [0.00425, 0.5289, 0.6738, 0.2763, 0.00466], rtol=1e-3)
    eps = np.asarray(L.min_snr_weight(SCH, jnp.asarray(t, jnp.int32), 5.0))
    np.testing.assert_allclose(got / eps, snr / (snr + 1), rtol=1e-5)


def test_debiased_loss_is_refused_for_v():
    z = np.zeros((1, 2, 2, 4), np.float32)
    with pytest.raises(ValueError, match="--debiased-loss is for eps-prediction models only"):
        L.diffusion_loss(lambda x, t, c: x, SCH, z, jnp.zeros((1,), jnp.int32), z, z, debiased=True, prediction="v")
    with pytest.raises(UserError, match="--debiased-loss is for eps-prediction models only"):
        make_train_step(toy_config("v"), OptimConfig(), StepConfig(debiased_loss=True))
    make_train_step(toy_config("v"), OptimConfig(), StepConfig(snr_gamma=5.0, multires_noise=0.8))  # the rest is
    make_train_step(toy_config("eps"), OptimConfig(), StepConfig(debiased_loss=True))  # allowed


class _Fake:
    def __init__(self, f):
        self.f = f

    def apply(self, variables, *args, **_):
        return self.f(variables["params"], *args)


@pytest.mark.parametrize("prediction", ["v"])  # eps: test_train_loss.py, and bit for bit below
def test_train_step_regresses_the_models_target(prediction, monkeypatch):
    """The compiled step (min-SNR 5) with a U-Net v_theta = w x (w = 0.5) against the loss written out here, on
    the step's own draws (t, noise, posterior sample: loss.py's key rule)."""
    fake = {"unet": _Fake(lambda p, x, t, c: p["w"] * x), "vae": None,
            "text_encoder": _Fake(lambda p, ids: jnp.zeros(ids.shape + (8,)))}
    monkeypatch.setattr(step_module, "modules", lambda *a, **k: fake)
    cfg = toy_config(prediction)
    moments = np.random.default_rng(4).standard_normal((1, 2, 2, 2, 8)).astype(np.float32)
    step = jax.jit(make_train_step(cfg, OptimConfig(), StepConfig(caption_dropout=0.0, snr_gamma=5.0)))
    _, metrics = step(init_state({"w": jnp.float32(0.5)}, OptimConfig()),
                      {"moments": moments, "ctx": np.zeros((1, 2, 3, 8), np.float32)}, key_data(0),
                      {"text_encoder": {}, "uncond_ids": np.zeros((1, 3), np.int32)})
    keys = L.example_keys(jax.random.fold_in(jax.random.key(0), 0), jnp.arange(2))
    d = L.draw(keys, (2, 2, 4), 1000, 0.0)
    z0 = np.asarray(L.posterior_sample(moments[0], d.posterior_eps, cfg.latent_scale), np.float64)
    t, noise = np.asarray(d.t), np.asarray(d.noise, np.float64)
    ab, snr = AB[t][:, None, None, None], AB[t] / (1.0 - AB[t])
    x_t = np.sqrt(ab) * z0 + np.sqrt(1.0 - ab) * noise
    target = noise if prediction == "eps" else np.sqrt(ab) * noise - np.sqrt(1.0 - ab) * z0
    weight = np.minimum(snr, 5.0) / (snr if prediction == "eps" else snr + 1.0)
    want = (((target - 0.5 * x_t) ** 2).mean(axis=(1, 2, 3)) * weight).mean()
    assert abs(float(metrics["loss"]) - want) <= 1e-5 * want


# ------------------------------------------------------------------------- (d) eps: the code before, bit for bit


def old_guided_eps_fn(sd, params, ctx, uncond_ctx, guidance, extra_channels=None, schedule=None, y=None,
                      uncond_y=None):
    """`program.guided_eps_fn` before v-prediction (commit abd1fc1), verbatim (`schedule` and SDXL's y, None here,
    added, unused)."""
    assert y is None and uncond_y is None

    def eps_fn(x, t):
        xin = x if extra_channels is None else jnp.concatenate([x, extra_channels.astype(x.dtype)], axis=-1)
        eps_u, eps_c = _split_pairs(sd.predict_noise(params, _interleave(xin, xin), jnp.repeat(t, 2),
                                                     _interleave(uncond_ctx, ctx)))
        return eps_u + guidance * (eps_c - eps_u)

    return eps_fn


def old_diffusion_loss(eps_fn, schedule, z0, t, noise, ctx, snr_gamma=None, debiased=False):
    """`loss.diffusion_loss` before v-prediction (commit abd1fc1), with its `min_snr_weight` inlined."""
    x_t = q_sample(schedule, z0, t, noise)
    pred = eps_fn(x_t, t, ctx).astype(jnp.float32)
    per_example = jnp.mean(jnp.square(noise.astype(jnp.float32) - pred), axis=tuple(range(1, pred.ndim)))
    if snr_gamma:
        snr_t = L.snr(schedule, t)
        per_example = per_example * (jnp.minimum(snr_t, snr_gamma) / snr_t)
    if debiased:
        per_example = per_example * L.debiased_weight(schedule, t)
    return jnp.mean(per_example)


@pytest.mark.parametrize("mode, sampler, inpainting", [PIPELINE_CASES[0], PIPELINE_CASES[2]])
def test_eps_pipelines_are_bit_for_bit_the_old_code(mode, sampler, inpainting, monkeypatch):
    new = eps_result(mode, sampler, inpainting)
    monkeypatch.setattr(program, "guided_eps_fn", old_guided_eps_fn)
    np.testing.assert_array_equal(new, request(toy("eps", inpainting), mode, sampler))


@pytest.mark.parametrize("gamma, debiased", [(None, False), (5.0, False), (5.0, True)])
def test_eps_loss_and_gradient_are_bit_for_bit_the_old_code(gamma, debiased):
    rng = np.random.default_rng(5)
    z0, noise = (rng.standard_normal((3, 4, 4, 4)).astype(np.float32) for _ in range(2))
    t, ctx = jnp.asarray([0, 450, 999], jnp.int32), np.zeros((3, 1, 1), np.float32)

    def value_and_grad(loss_fn):
        f = lambda w: loss_fn(lambda x, tt, c: w * jnp.tanh(x), SCH, z0, t, noise, ctx, gamma, debiased)  # noqa
        return jax.jit(jax.value_and_grad(f))(jnp.float32(0.7))

    for new, old in zip(value_and_grad(L.diffusion_loss), value_and_grad(old_diffusion_loss)):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    out = jnp.asarray(noise)
    assert eps_from_output(SCH, "eps", out, z0, t) is out


def test_prediction_is_validated():
    for bad in ("epsilon", "v_prediction", "V", ""):
        with pytest.raises(ValueError, match="schedule.prediction must be one of 'eps', 'v'"):
            configs.ScheduleConfig(prediction=bad)
    d = toy_config("v").to_dict()
    assert configs.ModelConfig.from_dict(d) == toy_config("v")
    for bad, match in (("v_prediction", "schedule.prediction must be"), (1, "schedule.prediction: expected str")):
        d["schedule"]["prediction"] = bad
        with pytest.raises(ValueError, match=match):
            configs.ModelConfig.from_dict(d)
    x = jnp.zeros((1, 2, 2, 4))
    t = jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="'eps' or 'v'"):
        eps_from_output(SCH, "x0", x, x, t)
    with pytest.raises(ValueError, match="'eps' or 'v'"):
        L.diffusion_loss(lambda a, b, c: a, SCH, x, t, x, x, prediction="x0")
