"""Sampler parity with diffusers' torch schedulers (what users compare against), full chains on both sides.

Both sides run the same deterministic eps model, eps(x, t) = A x + B sin(t / 100), on a [1, 2, 2, 1] latent, with
the SD 1.x betas (scaled_linear, 0.00085 .. 0.012, T = 1000), in float32 (our samplers are float32 by contract;
diffusers builds its tables in float32 and upcasts samples to float32). Pass: max|ours - diffusers| <= 2e-5
max|diffusers| (measured <= 6e-6; the mismatches listed below are >= 8e-5), identical integer t grids, and
sigmas within rtol 2e-5 (diffusers' float32 cumprod table is ~1e-5 off at small t; ours is float64-derived).

What each of our samplers equals (diffusers 0.42):
- "ddim" (eta 0): DDIMScheduler(steps_offset=1, set_alpha_to_one=False, clip_sample=False,
  timestep_spacing="leading"), for steps dividing T. Otherwise CompVis runs len(arange(0, T, T // S)) steps
  (31 for S = 30), diffusers S: different grids.
- "plms": PNDMScheduler(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, timestep_spacing="leading"),
  same condition. Same n + 1 U-Net calls: diffusers spreads CompVis' two-call first step (pseudo improved Euler)
  over two step() calls by repeating the second time step; the arithmetic is identical.
- "ddpm": DDPMScheduler(clip_sample=False, timestep_spacing="leading", steps_offset=0), same noise. SD's
  steps_offset=1 shifts every t by one (differs by 2e-2 .. 4e-2 here).
- "dpmpp_2m": DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True,
  final_sigmas_type="zero"); lower_order_final, euler_at_final and timestep_spacing make no difference (the last
  step goes to sigma 0, is first order and returns D). Start: we take x = sigma_max x_T in sigma space
  (k-diffusion), diffusers VP x = x_T (init_noise_sigma 1), so diffusers equals us given x_T sigma_max /
  sqrt(sigma_max^2 + 1) (0.99766 x_T); fed the same x_T the results differ by 2.7e-3. final_sigmas_type=
  "sigma_min" does not match (it stops at sigma_min). Karras t: for some S (18, 35, 43, ...) one t differs by 1,
  a rounding tie decided by diffusers' float32 table (see test_dpmpp_2m_karras_grid).
- "euler_a" (eta 1): EulerAncestralDiscreteScheduler(timestep_spacing="linspace") with the same noise, eta 0:
  EulerDiscreteScheduler(). Sigmas at the fractional time steps linspace(T - 1, 0, S) on both sides (ours
  log-linear as k-diffusion, diffusers linear: <= 1e-4 apart); the U-Net gets round(t) from us and the fractional
  t from diffusers, so the chains are equal when S - 1 divides T - 1 (S in 2, 4, 10, 28, 38, 112, 334, 1000) and
  otherwise when the diffusers-side model is given round(t) as well (measured below 1e-5; with diffusers' own
  fractional t about 1e-3 apart). Until 2026-11-28 we rounded t before taking sigma (sigmas up to 1 % apart).
  euler_a eta 0 with karras=True: EulerDiscreteScheduler(use_karras_sigmas=True) when the diffusers-side model
  gets round(t) (diffusers passes the fractional t).
- img2img: start_step_for_strength + noise_to_start reproduce StableDiffusionImg2ImgPipeline (t_start =
  S - int(S strength), add_noise at timesteps[t_start], set_begin_index(t_start)) for ddim, dpmpp_2m, euler_a.
  Not plms: diffusers slices PNDM's list (n + 1 entries, the second repeated) with the same t_start, so it starts
  one level higher than its DDIM img2img (S = 10, strength 0.5: at t 501, not 401) and from its third U-Net call
  on treats x as one level lower than it is (x at 401 stepped as 301 -> 201): diffusers' inconsistency; ours
  is the CompVis chain started at DDIM's level (relative difference 0.24 here).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import samplers as S
from ldm_jax.samplers.common import karras_sigmas, schedule_sigmas
from ldm_jax.schedules import make_schedule

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

SD = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SCH = make_schedule()
TOL = 2e-5
SHAPE = (1, 2, 2, 1)
A = np.array([0.9, 1.1, 0.7, 1.0], np.float32).reshape(SHAPE)
B = np.array([0.3, -0.2, 0.5, 0.1], np.float32).reshape(SHAPE)
X_T = np.array([0.5, -1.2, 1.7, -0.3], np.float32).reshape(SHAPE)
X0 = np.array([0.4, -0.8, 0.2, 1.0], np.float32).reshape(SHAPE)
NOISE = np.array([1.0, 0.3, -0.5, -1.4], np.float32).reshape(SHAPE)
KEYS = jax.random.split(jax.random.key(7), 1)


def eps_jax(x, t):
    return jnp.asarray(A) * x + jnp.asarray(B) * jnp.sin(t.astype(jnp.float32).reshape(-1, 1, 1, 1) / 100.0)


def eps_torch(x, t: float):
    return torch.from_numpy(A) * x + torch.from_numpy(B) * float(np.sin(t / 100.0))


def our_noise(i):
    """Our per-step noise rule, normal(fold_in(key_b, i)), written out here to feed diffusers the same draws."""
    return np.asarray(jax.random.normal(jax.random.fold_in(KEYS[0], i), SHAPE[1:]))[None]


def inject_noise(monkeypatch, module_name, first_step=0):
    """Make diffusers' randn_tensor in `module_name` return our noise of loop steps first_step, first_step+1, ..."""
    calls = []

    def fake(shape, **_):
        calls.append(None)
        return torch.from_numpy(our_noise(first_step + len(calls) - 1)).reshape(shape)

    monkeypatch.setattr(f"diffusers.schedulers.{module_name}.randn_tensor", fake)
    return calls


def diffusers_chain(sched, steps, x_T=None, start=0, t_model=float):
    """The diffusers pipeline loop (txt2img from x_T, or img2img from X0/NOISE at loop step `start`)."""
    sched.set_timesteps(steps)
    ts = sched.timesteps[start:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    if x_T is not None:
        x = torch.from_numpy(x_T) * sched.init_noise_sigma
    else:
        x = sched.add_noise(torch.from_numpy(X0), torch.from_numpy(NOISE), ts[:1])
    for t in ts:
        e = eps_torch(sched.scale_model_input(x, t), t_model(float(t)))
        x = sched.step(e, t, x).prev_sample
    return x.numpy()


def ours(name, steps, keys=None, start=None, **kw):
    """txt2img from X_T, or (start given) img2img from X0 noised with NOISE to the level of loop step `start`."""
    x_T = X_T if start is None else S.noise_to_start(name, SCH, jnp.asarray(X0), jnp.asarray(NOISE), steps, start)
    return np.asarray(S.sample(name, eps_jax, jnp.asarray(x_T), SCH, keys, steps=steps, start_step=start or 0,
                               **kw))


def assert_close(a, b, tol=TOL):
    err = float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())
    assert err <= tol, f"relative max error {err:.3g} > {tol:g}"


def ddim_sched():
    return diffusers.DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                                   timestep_spacing="leading")


def dpm_sched(**kw):
    return diffusers.DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver++", solver_order=2,
                                                 use_karras_sigmas=True, **kw)


def dpm_start(steps):
    """Our x_T expressed as diffusers' VP initial latent (see the module docstring)."""
    s_max = float(karras_sigmas(SCH, steps)[0][0])
    return (X_T * (s_max / np.sqrt(s_max**2 + 1.0))).astype(np.float32)


# ------------------------------------------------------------------------------------------------ txt2img


@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_matches_diffusers(steps):
    sched = ddim_sched()
    sched.set_timesteps(steps)
    np.testing.assert_array_equal(sched.timesteps.numpy(), S.ddim_timesteps(1000, steps)[::-1])
    assert_close(ours("ddim", steps), diffusers_chain(ddim_sched(), steps, X_T))


@pytest.mark.parametrize("steps", [10, 50])
def test_plms_matches_diffusers_pndm_skip_prk(steps):
    sched = diffusers.PNDMScheduler(**SD, steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True,
                                    timestep_spacing="leading")
    assert_close(ours("plms", steps), diffusers_chain(sched, steps, X_T))


@pytest.mark.parametrize("steps", [10, 50])
def test_ddpm_matches_diffusers(steps, monkeypatch):
    calls = inject_noise(monkeypatch, "scheduling_ddpm")
    sched = diffusers.DDPMScheduler(**SD, clip_sample=False, timestep_spacing="leading", steps_offset=0)
    theirs = diffusers_chain(sched, steps, X_T)
    assert len(calls) == steps - 1  # noise at every step but the last (t = 0), as ours
    assert_close(ours("ddpm", steps, KEYS), theirs)


@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_2m_karras_grid(steps):
    sched = dpm_sched()
    sched.set_timesteps(steps)
    sigmas, ts = karras_sigmas(SCH, steps)
    np.testing.assert_allclose(np.asarray(sigmas), sched.sigmas.numpy(), rtol=TOL)
    np.testing.assert_array_equal(np.asarray(ts), sched.timesteps.numpy())


def test_dpmpp_2m_karras_t_rounding_tie():
    """S = 18: t(sigma_7) is 575.4998 in float64 (ours: 575), 575.5005 from diffusers' float32 table (576)."""
    sched = dpm_sched()
    sched.set_timesteps(18)
    diff = np.asarray(karras_sigmas(SCH, 18)[1]) - sched.timesteps.numpy()
    assert np.flatnonzero(diff).tolist() == [7] and diff[7] == -1


@pytest.mark.parametrize("steps, kw", [(10, {}), (10, dict(lower_order_final=False)), (20, {}),
                                       (20, dict(euler_at_final=True, timestep_spacing="trailing"))])
def test_dpmpp_2m_karras_matches_diffusers(steps, kw):
    assert_close(ours("dpmpp_2m", steps), diffusers_chain(dpm_sched(final_sigmas_type="zero", **kw), steps,
                                                          dpm_start(steps)))


@pytest.mark.parametrize("steps", [4, 10, 20, 28, 30, 50])
def test_euler_ancestral_matches_diffusers(steps, monkeypatch):
    sched = diffusers.EulerAncestralDiscreteScheduler(**SD, timestep_spacing="linspace")
    sched.set_timesteps(steps)
    sigmas, ts = schedule_sigmas(SCH, steps)
    np.testing.assert_array_equal(np.asarray(ts), np.round(sched.timesteps.numpy()))
    np.testing.assert_allclose(np.asarray(sigmas), sched.sigmas.numpy(), rtol=1e-4)  # log-linear vs linear
    calls = inject_noise(monkeypatch, "scheduling_euler_ancestral_discrete")
    theirs = diffusers_chain(sched, steps, X_T, t_model=lambda t: float(np.round(t)))
    assert len(calls) == steps
    assert_close(ours("euler_a", steps, KEYS), theirs)


@pytest.mark.parametrize("steps", [10, 25])
def test_euler_eta0_matches_diffusers_euler(steps):
    theirs = diffusers_chain(diffusers.EulerDiscreteScheduler(**SD), steps, X_T, t_model=lambda t: float(np.round(t)))
    assert_close(ours("euler_a", steps, eta=0.0), theirs)


def test_euler_eta0_karras_matches_diffusers_with_rounded_t():
    out = np.asarray(S.euler_ancestral_sample(eps_jax, jnp.asarray(X_T), SCH, None, steps=12, eta=0.0,
                                              karras=True))
    sched = diffusers.EulerDiscreteScheduler(**SD, use_karras_sigmas=True)
    assert_close(out, diffusers_chain(sched, 12, X_T, t_model=lambda t: float(np.round(t))))


# ------------------------------------------------------------------------------------------------ img2img


@pytest.mark.parametrize("strength", [1.0, 0.5, 0.3])
def test_img2img_start_matches_diffusers(strength, monkeypatch):
    steps = 10
    start = S.start_step_for_strength(steps, strength)
    assert start == steps - min(int(steps * strength), steps)  # diffusers get_timesteps' t_start
    assert_close(ours("ddim", steps, start=start), diffusers_chain(ddim_sched(), steps, start=start))
    assert_close(ours("dpmpp_2m", steps, start=start), diffusers_chain(dpm_sched(), steps, start=start))
    inject_noise(monkeypatch, "scheduling_euler_ancestral_discrete", first_step=start)
    sched = diffusers.EulerAncestralDiscreteScheduler(**SD)
    assert_close(ours("euler_a", steps, KEYS, start=start), diffusers_chain(sched, steps, start=start))
