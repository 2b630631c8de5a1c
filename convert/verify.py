"""Parity of a loaded model against the torch reference with the same weights (`ldm-jax verify`).

The torch side (labml U-Net / autoencoder, transformers CLIPTextModel) is fed the Flax parameters written
back to the CompVis layout, so EMA selection, dtype upcasting and converted directories are covered too; a
wrong row in the key table would put a tensor in the wrong Flax slot and show up as a large error.
Measure: max|jax - torch| / max|torch|, fp32, highest matmul precision (DESIGN.md §5).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import jax
import numpy as np

from convert import torch_reference
from convert.mapping import params_to_state_dict
from ldm_jax.stable_diffusion import StableDiffusion


@dataclass(frozen=True)
class Row:
    component: str
    check: str
    rel_err: float
    tolerance: float

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


def verify(sd: StableDiffusion, *, components=("unet", "vae", "text_encoder"), tolerance: float = 1e-4,
           latent_hw=(16, 24), seed: int = 0, log=print) -> list[Row]:
    """Run each component on random inputs in JAX and torch; one Row per output compared."""
    torch = torch_reference.import_torch()
    jax.config.update("jax_default_matmul_precision", "highest")
    sd = sd.replace(dtype=np.float32)
    rng = np.random.default_rng(seed)
    h, w = latent_hw
    f = sd.config.vae.downsample_factor
    rows = []
    for c in components:
        log(f"verifying {c} ...")
        ref = torch_reference.build(sd.config, params_to_state_dict({c: sd.params[c]}), components=(c,))[c]
        with torch.no_grad():
            if c == "unet":
                x = rng.standard_normal((2, h, w, sd.config.unet.in_channels)).astype(np.float32)
                ctx = rng.standard_normal((2, sd.config.text.max_length, sd.config.unet.d_cond)).astype(np.float32)
                t = np.array([0, sd.config.schedule.n_steps - 1])
                want = _nhwc(ref(_nchw(torch, x), torch.from_numpy(t), torch.from_numpy(ctx)))
                rows.append(Row(c, "eps, t in {0, 999}", rel_err(jax.jit(sd.predict_noise)(sd.params, x, t, ctx),
                                                                  want), tolerance))
            elif c == "vae":
                img = rng.uniform(-1, 1, (2, h * f, w * f, sd.config.vae.in_channels)).astype(np.float32)
                z = rng.standard_normal((2, h, w, sd.config.vae.z_channels)).astype(np.float32)
                mean, dec = _nhwc(ref.encode(_nchw(torch, img)).mean), _nhwc(ref.decode(_nchw(torch, z)))
                s = sd.config.latent_scale
                rows.append(Row(c, "encode (posterior mean)",
                                rel_err(jax.jit(sd.encode_image)(sd.params, img) / s, mean), tolerance))
                rows.append(Row(c, "decode", rel_err(jax.jit(sd.decode_latents)(sd.params, z * s), dec), tolerance))
            else:
                ids = sd.tokenize(["a photograph of an astronaut riding a horse", "a red circle, 8k, детально"])
                want = ref(input_ids=torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
                rows.append(Row(c, "last hidden state", rel_err(jax.jit(sd.encode_text)(sd.params, ids), want),
                                tolerance))
        del ref
        gc.collect()
    return rows


def format_table(rows: list[Row]) -> str:
    lines = [f"{'component':<14}{'output':<26}{'max rel err':>12}{'tolerance':>11}  result"]
    for r in rows:
        lines.append(f"{r.component:<14}{r.check:<26}{r.rel_err:>12.2e}{r.tolerance:>11.0e}  "
                     + ("ok" if r.ok else "FAIL"))
    return "\n".join(lines)
