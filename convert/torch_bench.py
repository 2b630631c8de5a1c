"""The torch side of `ldm-jax bench --torch`: labml's U-Net and VAE decoder (the parity reference) and, when
diffusers is installed, diffusers' UNet2DConditionModel and AutoencoderKL built from the same preset (random
weights, no download), timed in the bench's process on the same device: fp16 on CUDA, fp32 on the CPU.
"""

from __future__ import annotations

import importlib.util
import statistics
import time

from ldm_jax.bench import Row
from ldm_jax.configs import ModelConfig

from convert.torch_reference import build_unet, build_vae, diffusers_unet, import_torch


def _device(torch):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return dev, (torch.float16 if dev == "cuda" else torch.float32)


def _median_seconds(torch, dev: str, fn, iters: int) -> float:
    """Median wall time of fn() over `iters` runs after one warm-up, inference mode, synchronised on CUDA."""
    def call():
        with torch.inference_mode():
            fn()
        if dev == "cuda":
            torch.cuda.synchronize()

    call()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        call()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _row(torch, dev, what, impl, batch, images, seconds, size):
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    return Row(what, impl, f"torch:{name}", "fp16" if dev == "cuda" else "fp32", batch, images, seconds, size=size,
               extra={"threads": torch.get_num_threads()})


def bench_labml_unet(cfg: ModelConfig, images: int, latent: int, iters: int, factor: int = 8) -> Row:
    """labml's U-Net, one step of 1 image + CFG (U-Net batch 2 x images), like `bench_unet`."""
    torch = import_torch()
    dev, dt = _device(torch)
    m = build_unet(cfg).to(dev, dt).eval()
    b = 2 * images
    x = torch.randn(b, 4, latent, latent, device=dev, dtype=dt)
    t = torch.full((b,), 500, device=dev)
    c = torch.randn(b, 77, cfg.unet.d_cond, device=dev, dtype=dt)

    def step():  # labml builds its time embedding in fp32: autocast feeds fp16 to the fp16 layers on CUDA
        with torch.autocast(dev, dtype=dt, enabled=dev == "cuda"):
            m(x, t, c)

    return _row(torch, dev, "unet_step_cfg", "labml-torch", b, images, _median_seconds(torch, dev, step, iters),
                latent * factor)


def bench_labml_vae(cfg: ModelConfig, images: int, latent: int, iters: int, factor: int = 8) -> Row:
    """labml's Autoencoder.decode (post-quant conv + decoder), like `bench_vae`."""
    torch = import_torch()
    dev, dt = _device(torch)
    m = build_vae(cfg).to(dev, dt).eval()
    z = torch.randn(images, cfg.vae.z_channels, latent, latent, device=dev, dtype=dt)
    return _row(torch, dev, "vae_decode", "labml-torch", images, images,
                _median_seconds(torch, dev, lambda: m.decode(z), iters), latent * factor)


def diffusers_available() -> bool:
    return importlib.util.find_spec("diffusers") is not None


def diffusers_models(cfg: ModelConfig):
    """(UNet2DConditionModel, AutoencoderKL) with the preset's architecture and diffusers' random init."""
    from diffusers import AutoencoderKL

    v = cfg.vae
    unet = diffusers_unet(cfg)
    n = len(v.channel_multipliers)
    vae = AutoencoderKL(in_channels=v.in_channels, out_channels=v.out_channels,
                        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        block_out_channels=tuple(v.channels * m for m in v.channel_multipliers),
                        layers_per_block=v.n_resnet_blocks, latent_channels=v.z_channels,
                        norm_num_groups=v.norm_groups)
    return unet, vae


def bench_diffusers(cfg: ModelConfig, images: int, latent: int, iters: int, factor: int = 8,
                    vae: bool = True) -> list[Row]:
    """diffusers' U-Net step (1 image + CFG) and, if `vae`, its VAE decode; eager, default attention processor
    (torch SDPA)."""
    torch = import_torch()
    dev, dt = _device(torch)
    # torch's own Module.to: diffusers' override warns about fp32-kept modules that these configs do not have
    unet, decoder = (torch.nn.Module.to(m, dev, dt).eval() for m in diffusers_models(cfg))
    b = 2 * images
    x = torch.randn(b, cfg.unet.in_channels, latent, latent, device=dev, dtype=dt)
    t = torch.full((b,), 500, device=dev)
    c = torch.randn(b, 77, cfg.unet.d_cond, device=dev, dtype=dt)
    added = None  # SDXL: the pooled text and the numbers (sizes, crop; refiner: a score) of its "text_time" embedding
    if cfg.unet.adm_in_channels:
        from ldm_jax.conditioning import AESTHETIC_SCORE

        numbers = [latent * factor] * 2 + [0, 0] + ([latent * factor] * 2 if cfg.is_sdxl else [AESTHETIC_SCORE])
        added = {"text_embeds": torch.randn(b, cfg.pooled_text.projection_dim, device=dev, dtype=dt),
                 "time_ids": torch.tensor([numbers] * b, device=dev, dtype=dt)}
    step = lambda: unet(x, t, encoder_hidden_states=c, added_cond_kwargs=added)  # noqa: E731
    rows = [_row(torch, dev, "unet_step_cfg", "diffusers", b, images, _median_seconds(torch, dev, step, iters),
                 latent * factor)]
    if vae:
        z = torch.randn(images, cfg.vae.z_channels, latent, latent, device=dev, dtype=dt)
        rows.append(_row(torch, dev, "vae_decode", "diffusers", images, images,
                         _median_seconds(torch, dev, lambda: decoder.decode(z), iters), latent * factor))
    return rows
