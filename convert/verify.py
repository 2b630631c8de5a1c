"""Parity of a loaded model against the torch reference with the same weights (`ldm-jax verify`).

The torch side (labml U-Net / autoencoder, transformers CLIPTextModel; for SD 2.x diffusers' U-Net and the
OpenCLIP tower loaded through diffusers' own conversions, for SDXL also its vector conditioning and the second,
projected text encoder, `convert.torch_reference`) is fed the checkpoint file's own
tensors (`reference`: its state dict; the EMA copies of the U-Net when the model was loaded with them), so
everything between the file and the Flax parameters is checked: the key table, the layout rules, EMA
selection and dtype upcasting. Each component first gets a "weights" row: the Flax parameters written back
to the CompVis layout against the file's tensors, naming the tensor that differs most. Without a reference
(a converted directory, whose source file is not at hand) torch gets the Flax parameters written back, which
still catches a wrong row in the key table (a tensor in the wrong Flax slot shows up as a large error).
Measure: max|jax - torch| / max|torch|, fp32, highest matmul precision (DESIGN.md §5).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import jax
import numpy as np

from convert import torch_reference
from convert.keys import key_table, layout_of, take_part, to_compvis_layout
from convert.mapping import leaf_at, normalise_keys, params_to_state_dict
from ldm_jax.models.build import components_of
from ldm_jax.stable_diffusion import StableDiffusion

PROMPTS = ["a photograph of an astronaut riding a horse", "a red circle, 8k, детально"]


@dataclass(frozen=True)
class Row:
    component: str
    check: str
    rel_err: float
    tolerance: float
    detail: str = ""  # the weights row: the tensor that differs most

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.rel_err) and self.rel_err <= self.tolerance)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _nchw(torch, x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().permute(0, 2, 3, 1).numpy()


def reference_weights(sd: StableDiffusion, component: str, reference) -> tuple[dict[str, np.ndarray], Row]:
    """The component's tensors from the checkpoint's state dict `reference` (CompVis keys, canonical shapes; the
    U-Net's EMA copies if `sd` was loaded with them) and a Row comparing them with `sd`'s parameters."""
    ema = bool(sd.metadata.get("ema")) and component == "unet"
    weights, worst, worst_err = {}, "", 0.0
    for entry in key_table(component, sd.params[component], text_layout=layout_of(sd.config)):
        key = entry.ema_key if ema else entry.key
        if key not in reference:
            return weights, Row(component, "weights vs file", float("inf"), 0.0, f"{key} missing from the file")
        want = np.asarray(reference[key], np.float32)
        if want.size != np.prod(entry.stored_shape):
            return weights, Row(component, "weights vs file", float("inf"), 0.0,
                                f"{key}: shape {want.shape} in the file, {entry.stored_shape} in the model")
        weights[entry.key] = want = want.reshape(entry.stored_shape)  # a Linear stored for a 1x1 conv
        want = take_part(entry, want)  # q, k or v of an OpenCLIP in_proj
        err = rel_err(to_compvis_layout(entry, np.asarray(leaf_at(sd.params[component], entry.flax_path))), want)
        if not worst or not err <= worst_err:  # NaN counts as the worst
            worst, worst_err = key, err
    detail = f"max at {worst}" if worst_err != 0 else f"all {len(weights)} tensors equal"
    return weights, Row(component, "weights vs file", worst_err, 0.0, detail)


def verify(sd: StableDiffusion, *, components=None, tolerance: float = 1e-4, latent_hw=(16, 24), seed: int = 0,
           reference=None, log=print) -> list[Row]:
    """Run each component (default: all of the model's, `components_of`) on random inputs in JAX and torch; one Row
    per output compared.

    reference: the checkpoint's state dict (CompVis keys): the torch side gets these tensors and a "weights"
    row per component compares them with `sd.params` (tolerance 0: loading only relayouts and upcasts).
    None: the torch side gets `sd.params` written back to the CompVis layout."""
    torch = torch_reference.import_torch()
    jax.config.update("jax_default_matmul_precision", "highest")
    sd = sd.replace(dtype=np.float32)
    rng = np.random.default_rng(seed)
    rows = []
    for c in components or components_of(sd.config):
        log(f"verifying {c} ...")
        if reference is None:
            weights = params_to_state_dict({c: sd.params[c]}, text_layout=layout_of(sd.config))
        else:
            weights, row = reference_weights(sd, c, normalise_keys(reference))
            rows.append(row)
            if not np.isfinite(row.rel_err):  # missing or misshapen: torch cannot be loaded with them
                continue
        ref = torch_reference.build(sd.config, weights, components=(c,))[c]
        del weights
        with torch.no_grad():
            rows += _CHECKS[c](sd, ref, rng, latent_hw, tolerance)
        del ref
        gc.collect()
    return rows


def _unet_rows(sd: StableDiffusion, ref, rng, latent_hw, tolerance) -> list[Row]:
    """The U-Net's output at t = 0 and the last step (SDXL: with a random pooled text and six size/crop numbers,
    the refiner five with its aesthetic score last, diffusers' `text_embeds` and `time_ids`, against
    `vector_conditioning` of the same)."""
    import torch

    cfg, (h, w) = sd.config, latent_hw
    x = rng.standard_normal((2, h, w, cfg.unet.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((2, cfg.text.max_length, cfg.unet.d_cond)).astype(np.float32)
    t = np.array([0, cfg.schedule.n_steps - 1])
    args, y = (_nchw(torch, x), torch.from_numpy(t), torch.from_numpy(ctx)), None
    what = f"{cfg.schedule.prediction}, t in {{0, {t[1]}}}"  # the output: eps, or v (SD 2.x 768)
    if cfg.y_numbers:
        f = cfg.vae.downsample_factor
        pooled = rng.standard_normal((2, cfg.pooled_text.projection_dim)).astype(np.float32)
        target, original, crop = (h * f, w * f), (2 * h * f + 8, 3 * w * f), (16, 8)
        score = 4.5 if cfg.is_sdxl_refiner else None  # the refiner: an aesthetic score instead of the target
        y = sd.vector_conditioning(pooled, target, original, crop, aesthetic_score=score)
        last = target if score is None else (score,)
        time_ids = np.tile(np.array(original + crop + last, np.float32), (2, 1))  # diffusers' add_time_ids order
        args += (torch.from_numpy(pooled), torch.from_numpy(time_ids))
        what += ", with y"
    want = _nhwc(ref(*args))
    return [Row("unet", what, rel_err(jax.jit(sd.predict_noise)(sd.params, x, t, ctx, y), want), tolerance)]


def _vae_rows(sd: StableDiffusion, ref, rng, latent_hw, tolerance) -> list[Row]:
    import torch

    cfg, (h, w) = sd.config, latent_hw
    f = cfg.vae.downsample_factor
    img = rng.uniform(-1, 1, (2, h * f, w * f, cfg.vae.in_channels)).astype(np.float32)
    z = rng.standard_normal((2, h, w, cfg.vae.z_channels)).astype(np.float32)
    mean, dec = _nhwc(ref.encode(_nchw(torch, img)).mean), _nhwc(ref.decode(_nchw(torch, z)))
    s = cfg.latent_scale
    return [Row("vae", "encode (posterior mean)", rel_err(jax.jit(sd.encode_image)(sd.params, img) / s, mean),
                tolerance),
            Row("vae", "decode", rel_err(jax.jit(sd.decode_latents)(sd.params, z * s), dec), tolerance)]


def _text_check(t) -> str:
    """What a text encoder's output is: the last hidden state, or layer L - k (SD 2.x: + final LN; SDXL: without)."""
    if not t.skip_last_layers:
        return "last hidden state"
    return f"layer {t.num_layers - t.skip_last_layers}" + (" + final LN" if t.norm_skipped_output else ", no final LN")


def _text_rows(sd: StableDiffusion, ref, rng, latent_hw, tolerance) -> list[Row]:
    """The first text encoder's states (SDXL: the first 768 channels of the context; the refiner: also its pooled,
    projected EOS state)."""
    import torch

    ids = sd.tokenize(PROMPTS)
    out = ref(input_ids=torch.from_numpy(ids.astype(np.int64)))
    got = jax.jit(sd.encode_text)(sd.params, ids)[..., :sd.config.text.hidden_size]
    rows = [Row("text_encoder", _text_check(sd.config.text), rel_err(got, out.last_hidden_state.numpy()), tolerance)]
    if sd.config.is_sdxl_refiner:
        _, pooled = jax.jit(lambda p, i: sd.encode_text(p, i, pooled=True))(sd.params, ids)
        rows.append(Row("text_encoder", "pooled (projected EOS)", rel_err(pooled, out.text_embeds.numpy()), tolerance))
    return rows


def _text_2_rows(sd: StableDiffusion, ref, rng, latent_hw, tolerance) -> list[Row]:
    """SDXL's second text encoder: its states (the context after the first encoder's channels), read from the ids
    re-padded with its pad token, and the pooled, projected EOS state."""
    import torch

    from ldm_jax.conditioning import repad

    cfg = sd.config
    ids = sd.tokenize(PROMPTS)
    ids_2 = np.asarray(repad(ids, cfg.text.eos_token_id, cfg.text_2.pad_token_id)).astype(np.int64)
    out = ref(input_ids=torch.from_numpy(ids_2))
    ctx, pooled = jax.jit(lambda p, i: sd.encode_text(p, i, pooled=True))(sd.params, ids)
    return [Row("text_encoder_2", _text_check(cfg.text_2),
                rel_err(ctx[..., cfg.text.hidden_size:], out.last_hidden_state.numpy()), tolerance),
            Row("text_encoder_2", "pooled (projected EOS)", rel_err(pooled, out.text_embeds.numpy()), tolerance)]


_CHECKS = {"unet": _unet_rows, "vae": _vae_rows, "text_encoder": _text_rows, "text_encoder_2": _text_2_rows}


def format_table(rows: list[Row]) -> str:
    lines = [f"{'component':<16}{'output':<26}{'max rel err':>12}{'tolerance':>11}  result"]
    for r in rows:
        lines.append(f"{r.component:<16}{r.check:<26}{r.rel_err:>12.2e}{r.tolerance:>11.0e}  "
                     + ("ok" if r.ok else "FAIL") + (f"  ({r.detail})" if r.detail else ""))
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    """'parity OK', or 'parity FAILED: ' + the failing row with the largest error and, if any loaded weights
    differ from the file's, the tensor that differs most."""
    bad = [r for r in rows if not r.ok]
    if not bad:
        return "parity OK"
    err = lambda r: r.rel_err if np.isfinite(r.rel_err) else float("inf")  # noqa: E731 - NaN: the worst
    worst = max(bad, key=err)
    text = f"parity FAILED: {worst.component} {worst.check}, max rel err {worst.rel_err:.2e} > {worst.tolerance:.0e}"
    weights = [r for r in bad if r.check == "weights vs file"]
    if weights:
        w = max(weights, key=err)
        text += f"; the {w.component} weights differ from the file ({w.detail}, rel err {w.rel_err:.2e})"
    return text
