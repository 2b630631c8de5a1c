"""Samplers vs independent references: labml's DDIMSampler / DDPMSampler (torch, same weights, injected noise),
numpy re-derivations of CompVis PLMS and of the k-diffusion update rules, analytic solutions, jit behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import samplers as S
from ldm_jax.samplers.common import karras_sigmas, schedule_sigmas
from ldm_jax.schedules import make_schedule

jax.config.update("jax_default_matmul_precision", "highest")

B, H, W, C, HID, L, D = 2, 6, 5, 4, 8, 3, 6
GUIDE = 7.5
SCH = make_schedule()
FREQS = np.array([1 / 1000, 1 / 250, 1 / 60, 1 / 15], np.float32)


def _params(seed=0):
    r = np.random.default_rng(seed)
    n = lambda *s, sc=0.5: (r.normal(size=s) * sc).astype(np.float32)  # noqa: E731
    return dict(w1=n(HID, C), b1=n(HID), wt=n(HID, 8), bt=n(HID), wc=n(HID, D), bc=n(HID), w2=n(C, HID))


P = _params()
_R = np.random.default_rng(1)
COND, UNCOND = (_R.normal(size=(B, L, D)).astype(np.float32) for _ in range(2))
X_T = _R.normal(size=(B, H, W, C)).astype(np.float32)
X0 = (0.8 * _R.normal(size=(B, H, W, C))).astype(np.float32)
NOISE0 = _R.normal(size=(B, H, W, C)).astype(np.float32)


def model_np(x, t, c, xp=np):
    """eps(x, t, c) = x + 0.3 W2 tanh(W1 x + b1 + emb(t) + proj(mean c)); NHWC; works for numpy and jnp."""
    tf = xp.asarray(t).astype(xp.float32 if xp is jnp else np.float64)[:, None] * FREQS
    temb = xp.concatenate([xp.sin(tf), xp.cos(tf)], -1) @ P["wt"].T + P["bt"]
    cemb = c.mean(1) @ P["wc"].T + P["bc"]
    h = xp.tanh(xp.einsum("bhwc,oc->bhwo", x, P["w1"]) + P["b1"] + (temb + cemb)[:, None, None, :])
    return x + 0.3 * xp.einsum("bhwo,co->bhwc", h, P["w2"])


def guided(xp=jnp, cond=COND, uncond=UNCOND, scale=GUIDE):
    """Classifier-free guidance as labml DiffusionSampler.get_eps, closed into eps_fn(x, t)."""
    def eps_fn(x, t):
        n = x.shape[0]
        e = model_np(xp.concatenate([x, x]), xp.concatenate([t, t]), xp.concatenate([uncond[:n], cond[:n]]), xp)
        e_u, e_c = e[:n], e[n:]
        return e_u + scale * (e_c - e_u)
    return eps_fn


def keys_for(n, seed=0, offset=0):
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(offset, offset + n))


@jax.jit
def _drawn_noise(keys, i):
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), (H, W, C)))(keys)


def drawn_noise(keys, i):
    """The per-image noise rule (normal(fold_in(key_b, step))), written out independently of the package."""
    return np.asarray(_drawn_noise(keys, i))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---------------------------------------------------------------------------------------------- labml (torch)


@pytest.fixture(scope="module")
def labml():
    torch = pytest.importorskip("torch")
    ld = pytest.importorskip("labml_nn.diffusion.stable_diffusion.latent_diffusion")
    from labml_nn.diffusion.stable_diffusion.sampler.ddim import DDIMSampler
    from labml_nn.diffusion.stable_diffusion.sampler.ddpm import DDPMSampler

    class TinyEps(torch.nn.Module):  # the same function as model_np, NCHW
        def __init__(self):
            super().__init__()
            for k, v in P.items():
                setattr(self, k, torch.nn.Parameter(torch.from_numpy(v)))
            self.register_buffer("freqs", torch.from_numpy(FREQS))

        def forward(self, x, t, c):
            tf = t.float()[:, None] * self.freqs
            temb = torch.cat([tf.sin(), tf.cos()], -1) @ self.wt.T + self.bt
            cemb = c.mean(1) @ self.wc.T + self.bc
            h = torch.tanh(torch.einsum("bchw,oc->bohw", x, self.w1) + (self.b1 + temb + cemb)[:, :, None, None])
            return x + 0.3 * torch.einsum("bohw,co->bchw", h, self.w2)

    model = ld.LatentDiffusion(TinyEps(), torch.nn.Identity(), torch.nn.Identity(), latent_scaling_factor=0.18215,
                               n_steps=1000, linear_start=0.00085, linear_end=0.012)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread hand-offs would dominate the 1000-step DDPM loop
    yield torch, model, DDIMSampler, DDPMSampler
    torch.set_num_threads(threads)


def nchw(torch, a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def inject(monkeypatch, torch, noises):
    """Make labml's torch.randn return our pre-drawn per-step noise, in order."""
    queue = [nchw(torch, z) for z in noises]

    def fake_randn(*shape, **kw):
        z = queue.pop(0)
        assert tuple(z.shape) == tuple(shape[0] if len(shape) == 1 else shape)
        return z.clone()
    monkeypatch.setattr(torch, "randn", fake_randn)
    return queue


def _labml_kwargs(torch):
    return dict(cond=torch.from_numpy(COND), uncond_scale=GUIDE, uncond_cond=torch.from_numpy(UNCOND))


def test_ddim_eta0_cfg_matches_labml(labml):
    torch, model, DDIMSampler, _ = labml
    want = nhwc(DDIMSampler(model, 10).sample([B, C, H, W], x_last=nchw(torch, X_T), **_labml_kwargs(torch)))
    got = jax.jit(lambda x: S.ddim_sample(guided(), x, SCH, keys_for(B), steps=10))(X_T)
    assert rel(got, want) <= 1e-5, rel(got, want)


def test_ddim_eta_quad_injected_noise_matches_labml(labml, monkeypatch):
    torch, model, DDIMSampler, _ = labml
    keys = keys_for(B, seed=3)
    queue = inject(monkeypatch, torch, [drawn_noise(keys, i) for i in range(10)])
    sampler = DDIMSampler(model, 10, ddim_discretize="quad", ddim_eta=0.5)
    want = nhwc(sampler.sample([B, C, H, W], x_last=nchw(torch, X_T), **_labml_kwargs(torch)))
    assert not queue
    got = S.ddim_sample(guided(), X_T, SCH, keys, steps=10, eta=0.5, discretize="quad")
    assert rel(got, want) <= 1e-5, rel(got, want)


def test_ddim_img2img_matches_labml_paint(labml, monkeypatch):
    torch, model, DDIMSampler, _ = labml
    steps, t_start = 10, 6  # labml paint runs tau indices t_start-1 .. 0
    start = steps - t_start
    assert S.start_step_for_strength(steps, 0.6) == start
    keys = keys_for(B, seed=5)
    sampler = DDIMSampler(model, steps, ddim_eta=0.5)
    x_lab = sampler.q_sample(nchw(torch, X0), t_start - 1, noise=nchw(torch, NOISE0))
    x_ours = S.noise_to_start("ddim", SCH, X0, NOISE0, steps, start)
    assert rel(x_ours, nhwc(x_lab)) <= 1e-6
    np.testing.assert_allclose(S.ddim_q_sample(SCH, X0, t_start - 1, NOISE0, steps=steps), x_ours, rtol=1e-6)
    inject(monkeypatch, torch, [drawn_noise(keys, i) for i in range(start, steps)])
    want = nhwc(sampler.paint(x_lab, torch.from_numpy(COND), t_start, uncond_scale=GUIDE,
                              uncond_cond=torch.from_numpy(UNCOND)))
    f = jax.jit(lambda x, s: S.sample("ddim", guided(), x, SCH, keys, steps=steps, eta=0.5, start_step=s))
    assert rel(f(x_ours, start), want) <= 1e-5, rel(f(x_ours, start), want)


def test_ddpm_matches_labml(labml, monkeypatch):
    torch, model, _, DDPMSampler = labml
    keys = keys_for(B, seed=7)
    noise = np.asarray(jax.vmap(lambda i: jax.vmap(
        lambda k: jax.random.normal(jax.random.fold_in(k, i), (H, W, C)))(keys))(jnp.arange(999)))
    queue = inject(monkeypatch, torch, list(noise))  # labml draws no noise at the last step (t = 0)
    want = nhwc(DDPMSampler(model).sample([B, C, H, W], x_last=nchw(torch, X_T), **_labml_kwargs(torch)))
    assert not queue
    got = jax.jit(lambda x: S.sample("ddpm", guided(), x, SCH, keys, steps=1000))(X_T)
    assert rel(got, want) <= 1e-5, rel(got, want)
    # img2img: labml sample(skip_steps=900, x_last=q_sample(x0, 99)) vs noise_to_start + start_step
    inject(monkeypatch, torch, list(noise[900:999]))
    sampler = DDPMSampler(model)
    x_lab = sampler.q_sample(nchw(torch, X0), 99, noise=nchw(torch, NOISE0))
    x_ours = S.noise_to_start("ddpm", SCH, X0, NOISE0, 1000, 900)
    assert rel(x_ours, nhwc(x_lab)) <= 1e-6
    want = nhwc(sampler.sample([B, C, H, W], x_last=x_lab, skip_steps=900, **_labml_kwargs(torch)))
    got = S.sample("ddpm", guided(), x_ours, SCH, keys, steps=1000, start_step=900)
    assert rel(got, want) <= 1e-5, rel(got, want)


def test_ddpm_strided_rederivation():
    """S < T: DDPM posterior over the strided chain with effective beta (diffusers DDPMScheduler), numpy float64."""
    steps, keys = 20, keys_for(B, seed=8)
    ab_all = np.asarray(SCH.alphas_cumprod, np.float64)
    x = X_T.astype(np.float64)
    for i, t in enumerate(range(950, -1, -50)):
        ab, ab_prev = ab_all[t], (ab_all[t - 50] if t >= 50 else 1.0)
        beta = 1 - ab / ab_prev
        e = guided(np)(x, np.full(B, t))
        x0 = (x - np.sqrt(1 - ab) * e) / np.sqrt(ab)
        mean = np.sqrt(ab_prev) * beta / (1 - ab) * x0 + np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab) * x
        x = mean + (np.sqrt(beta * (1 - ab_prev) / (1 - ab)) * drawn_noise(keys, i) if t > 0 else 0)
    got = S.ddpm_sample(guided(), X_T, SCH, keys, steps=steps)
    assert rel(got, x) <= 1e-5, rel(got, x)


# ------------------------------------------------------------------------------------------------------- PLMS


def plms_reference(x, steps, start=0, keep=None):
    """CompVis PLMSSampler.plms_sampling / p_sample_plms (eta = 0, optional mask/x0 blend), float64 numpy."""
    ab = np.asarray(SCH.alphas_cumprod, np.float64)
    tau = np.asarray(range(0, 1000, 1000 // steps)) + 1
    alphas, alphas_prev = ab[tau], np.asarray([ab[0]] + ab[tau[:-1]].tolist())
    time_range = np.flip(tau)
    eps, old_eps = guided(np), []

    def x_prev(x, e_t, index):
        pred_x0 = (x - np.sqrt(1 - alphas[index]) * e_t) / np.sqrt(alphas[index])
        return np.sqrt(alphas_prev[index]) * pred_x0 + np.sqrt(1 - alphas_prev[index]) * e_t

    for i, step in enumerate(time_range):
        if i < start:
            continue
        index = len(tau) - i - 1
        if keep is not None:  # CompVis: img = q_sample(x0, ts) * mask + (1 - mask) * img, before the step
            x = keep * (np.sqrt(alphas[index]) * X0 + np.sqrt(1 - alphas[index]) * NOISE0) + (1 - keep) * x
        t_next = time_range[min(i + 1, len(time_range) - 1)]
        e_t = eps(x, np.full(B, step))
        if len(old_eps) == 0:
            e_t_prime = (e_t + eps(x_prev(x, e_t, index), np.full(B, t_next))) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x_prev(x, e_t_prime, index)
        old_eps = (old_eps + [e_t])[-3:]
    return x


@pytest.mark.parametrize("steps,start", [(10, 0), (10, 3), (25, 0)])
def test_plms_matches_compvis_rederivation(steps, start):
    x_in = X_T if start == 0 else np.asarray(S.noise_to_start("plms", SCH, X0, NOISE0, steps, start))
    want = plms_reference(x_in.astype(np.float64), steps, start)
    got = jax.jit(lambda x, s: S.plms_sample(guided(), x, SCH, None, steps=steps, start_step=s))(x_in, start)
    assert rel(got, want) <= 1e-5, rel(got, want)


def test_plms_known_blend_matches_compvis_rederivation():
    keep = (np.arange(W)[None, None, :, None] < 2).astype(np.float32) * np.ones((B, H, 1, 1), np.float32)
    want = plms_reference(X_T.astype(np.float64), 10, 0, keep)
    got = S.sample("plms", guided(), X_T, SCH, None, steps=10, known=S.Known(X0, keep, NOISE0))
    assert rel(got, want) <= 1e-5, rel(got, want)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler_a", "dpmpp_2m"])
def test_known_blend_level_matches_noise_to_start(name):
    """keep = 1 everywhere: the last loop step starts from x0 at that step's level, i.e. from
    noise_to_start(..., start_step=last) (same noise key index, empty multistep history at the last step)."""
    steps, eta = 6, (0.5 if name == "ddim" else None)
    last = S.n_loop_steps(name, SCH.n_steps, steps) - 1  # ddim: 7 loop steps for S = 6 (CompVis quirk)
    f = jax.jit(lambda x, keep, s: S.sample(name, guided(), x, SCH, keys_for(B), steps=steps, eta=eta, start_step=s,
                                            known=S.Known(X0, keep, NOISE0)))
    ones, zeros = np.ones((B, H, W, 1), np.float32), np.zeros((B, H, W, 1), np.float32)
    want = f(S.noise_to_start(name, SCH, X0, NOISE0, steps, last), zeros, last)
    got = f(X_T, ones, 0)
    assert rel(got, want) <= 1e-6, rel(got, want)


# ------------------------------------------------------------------------------------ k-diffusion samplers


def karras_np(steps, rho=7.0, exact=True):
    """Karras grid (float64 formula, or the sampler's float32 values) and k-diffusion's quantized t."""
    ab = np.asarray(SCH.alphas_cumprod, np.float64)
    sig = np.sqrt((1 - ab) / ab)
    ramp = np.linspace(0, 1, steps)
    s = (sig[-1] ** (1 / rho) + ramp * (sig[0] ** (1 / rho) - sig[-1] ** (1 / rho))) ** rho
    if not exact:
        s = np.asarray(karras_sigmas(SCH, steps, rho)[0], np.float64)[:-1]
    t = np.abs(np.log(s)[None, :] - np.log(sig)[:, None]).argmin(0)  # k-diffusion quantize=True
    return np.append(s, 0.0), t


def denoise_np(x, s, t):
    return x - s * guided(np)(x / np.sqrt(s**2 + 1), np.full(B, t))


def test_sigma_grids():
    s, t = karras_sigmas(SCH, 12)
    s_np, t_np = karras_np(12)
    np.testing.assert_allclose(np.asarray(s), s_np, rtol=3e-5)  # fp32 (as k-diffusion): rho = 7 amplifies rounding
    np.testing.assert_array_equal(np.asarray(t), t_np)
    s, t = schedule_sigmas(SCH, 4)
    np.testing.assert_array_equal(np.asarray(t), [999, 666, 333, 0])
    np.testing.assert_allclose(np.asarray(s)[:4], np.asarray(SCH.sigmas)[[999, 666, 333, 0]], rtol=1e-6)
    assert float(s[4]) == 0
    s, t = schedule_sigmas(SCH, 20)  # fractional t = 999 - 999 i / 19: sigma log-interpolated, the U-Net gets round(t)
    frac = np.linspace(999, 0, 20)
    log_sigmas = np.log(np.asarray(SCH.sigmas, np.float64))
    np.testing.assert_allclose(np.asarray(s)[:20], np.exp(np.interp(frac, np.arange(1000), log_sigmas)), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(t), np.round(frac))


def test_dpmpp_2m_steps_match_update_rule():
    """Steps 5 (first order), 6 (2M with r = h_last / h) and 7 (to sigma = 0) of an 8-step run, by hand."""
    steps, start = 8, 5
    sig, ts = karras_np(steps, exact=False)
    lam = lambda s: -np.log(s)  # noqa: E731
    x = X0 + sig[start] * NOISE0.astype(np.float64)
    d5 = denoise_np(x, sig[5], ts[5])
    x = sig[6] / sig[5] * x - np.expm1(-(lam(sig[6]) - lam(sig[5]))) * d5
    d6 = denoise_np(x, sig[6], ts[6])
    h, h_last = lam(sig[7]) - lam(sig[6]), lam(sig[6]) - lam(sig[5])
    r = h_last / h
    x = sig[7] / sig[6] * x - np.expm1(-h) * ((1 + 1 / (2 * r)) * d6 - 1 / (2 * r) * d5)
    want = denoise_np(x, sig[7], ts[7])
    x_T = S.noise_to_start("dpmpp_2m", SCH, X0, NOISE0, steps, start)
    np.testing.assert_allclose(np.asarray(x_T) * sig[0], X0 + sig[start] * NOISE0, rtol=1e-5, atol=1e-6)
    got = S.sample("dpmpp_2m", guided(), x_T, SCH, None, steps=steps, start_step=start)
    assert rel(got, want) <= 1e-5, rel(got, want)


@pytest.mark.parametrize("karras", [False, True])
def test_euler_ancestral_steps_match_update_rule(karras):
    steps, start, eta = 8, 5, 0.7
    keys = keys_for(B, seed=11)
    if karras:
        sig, ts = karras_np(steps, exact=False)
    else:
        frac = np.linspace(999, 0, steps)  # k-diffusion get_sigmas: log-linear sigma at fractional t; U-Net round(t)
        ts = np.round(frac).astype(int)
        sig = np.append(np.exp(np.interp(frac, np.arange(1000), np.log(np.asarray(SCH.sigmas, np.float64)))), 0.0)
    x = X0 + sig[start] * NOISE0.astype(np.float64)
    for i in range(start, steps):
        den = denoise_np(x, sig[i], ts[i])
        s, sn = sig[i], sig[i + 1]
        up = min(sn, eta * np.sqrt(sn**2 * (s**2 - sn**2) / s**2))
        down = np.sqrt(sn**2 - up**2)
        x = x + (x - den) / s * (down - s)
        if sn > 0:
            x = x + drawn_noise(keys, i) * up
    x_T = S.euler_ancestral.euler_ancestral_noise_to_start(SCH, X0, NOISE0, steps=steps, start_step=start,
                                                           karras=karras)
    got = S.euler_ancestral_sample(guided(), x_T, SCH, keys, steps=steps, eta=eta, karras=karras, start_step=start)
    assert rel(got, x) <= 1e-5, rel(got, x)


def point_mass_eps(x_star):
    """Ideal eps_theta for data = a point mass at x*: eps = (x_t - sqrt(alpha_bar_t) x*) / sqrt(1 - alpha_bar_t)."""
    def eps_fn(x, t):
        a = SCH.alphas_cumprod[t][:, None, None, None]
        return (x - jnp.sqrt(a) * x_star) / jnp.sqrt(1 - a)
    return eps_fn


@pytest.mark.parametrize("name,eta", [("dpmpp_2m", None), ("euler_a", None), ("ddim", 0.0)])
def test_point_mass_lands_on_data(name, eta):
    got = S.sample(name, point_mass_eps(X0), X_T, SCH, keys_for(B), steps=15, eta=eta)
    # DDIM stops at table index 0 (sigma_min = 0.029), the k-samplers at sigma = 0
    assert rel(got, X0) <= (0.06 if name == "ddim" else 1e-5), rel(got, X0)


def test_dpmpp_2m_converges_to_many_step_ddim():
    """Probability-flow ODE: DDIM with 250 steps (+ the x_0 prediction at t = 0) as the reference. The floor
    (~0.3%) comes from the reference itself and from rounding t(sigma) to integers for the model."""
    eps = guided(scale=3.0)
    smax = float(SCH.sigma_max)
    x_vp = X_T * smax / np.sqrt(smax**2 + 1)  # the same start as sigma_max * x_T in sigma space
    x = S.ddim_sample(eps, x_vp, SCH, keys_for(B), steps=250)
    a0 = SCH.alphas_cumprod[0]
    ref = (x - jnp.sqrt(1 - a0) * eps(x, jnp.zeros(B, jnp.int32))) / jnp.sqrt(a0)
    errs = {n: rel(S.sample("dpmpp_2m", eps, X_T, SCH, None, steps=n), ref) for n in (10, 50)}
    assert errs[50] < errs[10] / 10 and errs[50] < 0.02, errs


# -------------------------------------------------------------------------------------- jit, keys, API


def test_no_recompile_for_eta_guidance_start_step():
    traces = []

    def run(name, x, keys, eta, g, s):
        traces.append(name)
        return S.sample(name, guided(scale=g), x, SCH, keys, steps=6, eta=eta, start_step=s)

    f = jax.jit(run, static_argnums=0)
    for name, etas in [("ddim", (0.0, 0.5, 1.0)), ("euler_a", (1.0, 0.3, 0.0)), ("plms", (0.0,) * 3)]:
        outs = [f(name, X_T, keys_for(B), e, g, s) for e, g, s in zip(etas, (7.5, 3.0, 1.0), (0, 2, 5))]
        assert traces.count(name) == 1, traces
        assert rel(outs[0], outs[1]) > 1e-3 and rel(outs[1], outs[2]) > 1e-3
    assert f._cache_size() == 3


@pytest.mark.parametrize("name,eta", [("ddim", 0.8), ("euler_a", 1.0)])
def test_batch_split_invariance(name, eta):
    x, keys = np.concatenate([X_T, X0]), keys_for(4, seed=2)
    cond, uncond = np.concatenate([COND, UNCOND]), np.concatenate([UNCOND, COND])
    run = jax.jit(lambda x, k, c, u: S.sample(name, guided(cond=c, uncond=u), x, SCH, k, steps=8, eta=eta))
    whole = run(x, keys, cond, uncond)
    parts = np.concatenate([run(x[i:i + 1], keys[i:i + 1], cond[i:i + 1], uncond[i:i + 1]) for i in range(4)])
    assert rel(parts, whole) <= 1e-6


def test_progress_and_strength_zero():
    seen = []
    out = S.sample("euler_a", guided(), X_T, SCH, keys_for(B), steps=7, start_step=3, progress=seen.append)
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert sorted(seen) == [3, 4, 5, 6]
    for name in S.SAMPLERS:
        for steps in (10, 30):  # 30: ddim/plms run 31 loop steps (CompVis), and still none at strength 0
            s = S.start_step_for_strength(steps, 0.0, S.n_loop_steps(name, SCH.n_steps, steps))
            x = S.noise_to_start(name, SCH, X0, NOISE0, steps, s)
            np.testing.assert_allclose(S.sample(name, guided(), x, SCH, keys_for(B), steps=steps, start_step=s), X0,
                                       rtol=1e-6, atol=1e-6)
    for name in ("ddim", "plms", "dpmpp_2m"):  # strength 0.5 of 30 steps runs 15 (CompVis t_enc), not 16
        seen = []
        s = S.start_step_for_strength(30, 0.5, S.n_loop_steps(name, SCH.n_steps, 30))
        jax.block_until_ready(S.sample(name, guided(), X_T, SCH, None, steps=30, start_step=s, progress=seen.append))
        jax.effects_barrier()
        assert len(seen) == 15, (name, len(seen))


def test_errors_and_helpers():
    assert S.default_eta("ddim") == 0.0 and S.default_eta("euler_a") == 1.0 and S.default_eta("plms") is None
    assert S.NO_ETA == {"ddpm", "plms", "dpmpp_2m"} and set(S.SAMPLERS) == S.NO_ETA | {"ddim", "euler_a"}
    with pytest.raises(ValueError, match="unknown sampler"):
        S.sample("heun", guided(), X_T, SCH, keys_for(B), steps=5)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        S.sample("ddim", guided(), X_T, SCH, keys_for(B), steps=0)
    with pytest.raises(ValueError, match="static"):
        S.sample("ddim", guided(), X_T, SCH, keys_for(B), steps=jnp.int32(5))
    with pytest.raises(ValueError, match="has no eta"):
        S.sample("plms", guided(), X_T, SCH, keys_for(B), steps=5, eta=0.5)
    with pytest.raises(ValueError, match="needs keys"):
        S.sample("euler_a", guided(), X_T, SCH, None, steps=5)
    with pytest.raises(ValueError, match="one key per image"):
        S.sample("ddim", guided(), X_T, SCH, keys_for(3), steps=5, eta=0.5)
    with pytest.raises(ValueError, match="do not fit T="):
        S.ddim_timesteps(1000, 600)
    with pytest.raises(ValueError, match="strength"):
        S.start_step_for_strength(10, 1.5)
    assert S.start_step_for_strength(50, 0.75) == 13 and S.start_step_for_strength(50, 1.0) == 0
    np.testing.assert_array_equal(S.ddim_timesteps(1000, 4), [1, 251, 501, 751])
    np.testing.assert_array_equal(S.ddim_timesteps(1000, 4, "quad"), [1, 89, 356, 801])
    assert S.n_loop_steps("ddim", 1000, 30) == 31 and S.n_loop_steps("euler_a", 1000, 30) == 30
