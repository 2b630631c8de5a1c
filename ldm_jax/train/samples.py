"""Sample images during training (`--sample-every`): `check_sample_steps` refuses, before training, a step count the
sampler would refuse later, and `save_samples` draws the fixed prompts with the EMA weights (DDIM) and writes them as
RUN_DIR/samples/step<step>-<index>.png with prompt/seed/step metadata. `samples_missing` tells a resumed run that
the samples of its checkpoint's step were never written (the run stopped while drawing them), so it draws them."""

from __future__ import annotations

import functools
import os

import jax

from ldm_jax.errors import UserError
from ldm_jax.train.config import TrainConfig
from ldm_jax.train import textual_inversion as TI
from ldm_jax.train.lora import text_components
from ldm_jax.train.step import components, merged_text_encoder, merged_unet


def check_sample_steps(config, cfg: TrainConfig) -> None:
    """Refuse, before training, a --sample-steps that the DDIM sampler of the samples would refuse at the first
    --sample-every step (CompVis' time steps do not fit every count)."""
    if not cfg.sample_every:
        return
    from ldm_jax.samplers import n_loop_steps

    try:
        n_loop_steps("ddim", config.schedule.n_steps, cfg.sample_steps)
    except ValueError as e:
        raise UserError(f"--sample-steps {cfg.sample_steps}: {e}") from None


def _sample_path(run_dir: str, step: int, index: int) -> str:
    return os.path.join(run_dir, "samples", f"step{step:07d}-{index:02d}.png")


def samples_missing(cfg: TrainConfig, step: int, run_dir: str) -> bool:
    """Whether step `step` is a sampling step (every --sample-every steps, and the last) whose images are not all
    in RUN_DIR/samples (each PNG is written atomically: one that exists is whole). Every process reads the same
    answer: multi-host runs share RUN_DIR (`preflight.check_shared_run_dir`)."""
    if not cfg.sample_every or not step or (step % cfg.sample_every and step != cfg.steps):
        return False
    return not all(os.path.exists(_sample_path(run_dir, step, i)) for i in range(len(cfg.sample_prompts)))


@functools.lru_cache(maxsize=2)
def _jitted_merge(config, step_cfg):
    """(frozen, LoRA) -> {"unet"[, text encoders]}: the components a LoRA run adapts, merged (one small program)."""
    def merge(frozen, lora_params):
        out = {"unet": merged_unet(frozen["unet"], lora_params, config, step_cfg)}
        if step_cfg.train_text_encoder:
            out.update({c: merged_text_encoder(frozen[c], lora_params, config, step_cfg, c)
                        for c in text_components(config)})
        return out

    return jax.jit(merge)


_jitted_rows = jax.jit(TI.with_rows)


def save_samples(sd, frozen, state, cfg: TrainConfig, res: int, step: int, run_dir: str, mesh) -> None:
    """Sample images at the fixed prompts with the EMA weights (one compiled program, reused across calls)."""
    from ldm_jax.images import save_png
    from ldm_jax.pipelines.generate import txt2img

    sd.params.update({c: frozen[c] for c in ("vae", "text_encoder", "text_encoder_2") if c in frozen})
    if cfg.step.textual_inversion:  # the frozen model with the word's EMA rows
        sd.params.update({c: _jitted_rows(frozen[c], state.ema_params[c]) for c in text_components(sd.config)})
        sd.params["unet"] = frozen["unet"]
    elif cfg.step.lora_rank:  # the base U-Net (and text encoder) with the EMA LoRA merged in
        base = {c: frozen[c] for c in ("unet",) + text_components(sd.config)}
        sd.params.update(_jitted_merge(sd.config, cfg.step)(base, state.ema_params))
    else:
        sd.params.update(components(state.ema_params, cfg.step))
    sd.cache[("params", id(mesh))] = sd.params  # already replicated on the mesh: no copy (see generate.py)
    images = txt2img(sd, list(cfg.sample_prompts), steps=cfg.sample_steps, guidance_scale=cfg.sample_scale,
                     height=res, width=res, seed=cfg.seed)
    sd.cache.pop(("params", id(mesh)))  # the state is donated to the next step
    if jax.process_index() == 0:
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
        for i, (img, prompt) in enumerate(zip(images, cfg.sample_prompts)):
            save_png(_sample_path(run_dir, step, i), img,
                     {"prompt": prompt, "seed": cfg.seed, "index": i, "step": step, "sampler": "ddim",
                      "steps": cfg.sample_steps, "scale": cfg.sample_scale, "unet": "ema"})
