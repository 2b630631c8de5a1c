"""Device checks that need an accelerator (run by hand on a GPU; results go in the README):
bf16 vs fp32 txt2img from the same x_T (PSNR), fp32 GPU vs the labml torch U-Net on the same GPU, which
attention implementation each layer uses, and XLA's peak-memory accounting of txt2img at batch 1, 8, 16.

    PYTHONPATH=. python scripts/gpu_checks.py --out results.json [--skip-memory]
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.bench import _mem_mb, device_name
from ldm_jax.configs import preset
from ldm_jax.images import psnr
from ldm_jax.models.build import random_params
from ldm_jax.pipelines import Timings, txt2img
from ldm_jax.stable_diffusion import StableDiffusion


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--preset", default="sd1")
    ap.add_argument("--size", type=int, default=512)
    a = ap.parse_args()
    res = {"device": device_name()}

    def save():
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)

    cfg = preset(a.preset)
    lat = a.size // cfg.vae.downsample_factor
    t0 = time.perf_counter()
    params = jax.device_put(random_params(cfg, 0))
    res["random_params_s"] = round(time.perf_counter() - t0, 1)
    fp32 = StableDiffusion(cfg, params, dtype=jnp.float32)
    bf16 = StableDiffusion(cfg, params, dtype=jnp.bfloat16)
    x_T = np.random.default_rng(0).standard_normal((1, lat, lat, 4)).astype(np.float32)
    prompt = ["a photograph of an astronaut riding a horse"]
    out = {}
    for name, sd in (("fp32", fp32), ("bf16", bf16)):
        tm = Timings()
        out[name] = txt2img(sd, prompt, steps=a.steps, latents=x_T, height=a.size, width=a.size, timings=tm)
        lat_out = txt2img(sd, prompt, steps=a.steps, latents=x_T, height=a.size, width=a.size, output="latents")
        out[name + "_lat"] = lat_out
        res[f"txt2img_1_{name}_s"] = round(tm.run, 3)
        res[f"txt2img_1_{name}_compile_s"] = round(tm.compile, 1)
        print(name, tm, flush=True)
    res["psnr_bf16_vs_fp32_db"] = round(psnr(out["bf16"], out["fp32"]), 2)
    d = out["bf16_lat"] - out["fp32_lat"]
    res["latent_rel_err_bf16_vs_fp32"] = float(np.abs(d).max() / np.abs(out["fp32_lat"]).max())
    save()
    print(res, flush=True)

    # fp32 on the GPU against labml's torch U-Net on the same GPU (TF32 off on both sides).
    try:
        import torch

        from convert.mapping import params_to_state_dict
        from convert.torch_reference import build
        from convert.verify import rel_err

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        jax.config.update("jax_default_matmul_precision", "highest")
        ref = build(cfg, params_to_state_dict({"unet": params["unet"]}), components=("unet",))["unet"].cuda()
        rng = np.random.default_rng(1)
        x = rng.standard_normal((2, lat, lat, 4)).astype(np.float32)
        ctx = rng.standard_normal((2, 77, cfg.unet.d_cond)).astype(np.float32)
        t = np.array([0, 999])
        with torch.no_grad():
            want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)).cuda(), torch.from_numpy(t).cuda(),
                       torch.from_numpy(ctx).cuda()).permute(0, 2, 3, 1).cpu().numpy()
        got = jax.jit(fp32.predict_noise)(fp32.params, x, t, ctx)
        res["gpu_fp32_unet_rel_err_vs_labml"] = rel_err(got, want)
        del ref
    except Exception as e:  # noqa: BLE001 - report, don't die: the other checks still count
        res["gpu_fp32_unet_rel_err_vs_labml"] = f"failed: {e}"
    save()
    print(res, flush=True)

    if not a.skip_memory:
        for n in (1, 8, 16):
            tm = Timings()
            txt2img(bf16, prompt * n, steps=a.steps, height=a.size, width=a.size, timings=tm)
            prog = [v for k, v in bf16.cache.items() if k[0] == "program"][-1]
            res[f"txt2img_{n}_bf16_program_mb"] = _mem_mb(prog)
            res[f"txt2img_{n}_bf16_s"] = round(tm.run, 3)
            stats = jax.devices()[0].memory_stats() or {}
            res[f"after_{n}_peak_bytes_in_use_mb"] = round(stats.get("peak_bytes_in_use", 0) / 2**20, 1)
            save()
            print(res, flush=True)


if __name__ == "__main__":
    main()
