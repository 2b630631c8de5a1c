"""The trained model as a converted directory (readable by `ldm_jax.load` and `ldm-jax export`), or a LoRA run's
LoRA as a kohya-ss file (RUN_DIR/lora.safetensors, `lora.py`): `export_model` writes it from a `TrainState` (at the
end of `loop.train`), `export_run` from the latest checkpoint of a run directory (`ldm-jax train --export-only`)."""

from __future__ import annotations

import dataclasses
import os

from ldm_jax import parallel
from ldm_jax.errors import UserError
from ldm_jax.train import preflight
from ldm_jax.train.base import load_base, run_prediction
from ldm_jax.train.checkpoint import Checkpoints, check_same_model
from ldm_jax.train.resume import state_shapes
from ldm_jax.train.state import OptimConfig, TrainState
from ldm_jax.train import lora
from ldm_jax.train import textual_inversion as TI
from ldm_jax.train.step import StepConfig, components


def output_file(step_cfg: StepConfig) -> str | None:
    """The file a run writes instead of a model directory: a LoRA's or a textual inversion's, else None."""
    return lora.FILE if step_cfg.lora_rank else TI.FILE if step_cfg.textual_inversion else None


def result_kind(step_cfg: StepConfig) -> str:
    """What a run writes, in words: "LoRA", "embedding" or "model"."""
    return "LoRA" if step_cfg.lora_rank else "embedding" if step_cfg.textual_inversion else "model"


def export_path(run_dir: str, step_cfg: StepConfig) -> str:
    """Where a run's result goes: RUN_DIR/model, or a LoRA run's RUN_DIR/lora.safetensors, or a textual inversion's
    RUN_DIR/embedding.safetensors."""
    return os.path.join(run_dir, output_file(step_cfg) or "model")


def export_model(out_dir: str, sd, state: TrainState, step_cfg: StepConfig, *, ema: bool, meta: dict,
                 resolution: int | None = None):
    """Write the trained model (the trained components from `state`, the frozen ones from `sd`) as a converted
    directory; its config's `image_size` (the default sampling size) becomes the training resolution. A LoRA run
    writes its LoRA as a kohya-ss file at `out_dir` instead."""
    from convert.orbax_io import write_converted

    if step_cfg.lora_rank:
        return _write_lora(out_dir, sd.config, state.ema_params if ema else state.params, step_cfg, ema, meta,
                           resolution)
    if step_cfg.textual_inversion:  # meta["word"]: the trained word
        return TI.write(out_dir, state.ema_params if ema else state.params, meta["word"], meta)

    params = {"vae": sd.params["vae"], "text_encoder": sd.params.get("text_encoder"),
              **{c: sd.params[c] for c in ("text_encoder_2",) if c in sd.params},
              **components(state.ema_params if ema else state.params, step_cfg)}
    metadata = {"source": f"ldm-jax train {meta.get('run_dir')} step {meta.get('step')}", "kind": sd.config.name,
                "ema": bool(ema), "ema_available": True, "train": meta}
    config = dataclasses.replace(sd.config, image_size=int(resolution)) if resolution else sd.config
    write_converted(out_dir, config, params, metadata, overwrite=True)


def _write_lora(path: str, config, params, step_cfg: StepConfig, ema: bool, meta: dict, resolution) -> None:
    import jax

    from convert.errors import CheckpointError
    from convert.safetensors_io import write_safetensors

    alpha = float(step_cfg.lora_alpha or step_cfg.lora_rank)
    conv_rank = step_cfg.lora_conv_rank
    conv_alpha = float(step_cfg.lora_conv_alpha or conv_rank) if conv_rank else None
    tensors = lora.kohya_tensors(jax.device_get(params), config, step_cfg.lora_targets, alpha, conv_alpha)
    extra = {"ldm_jax_source": f"ldm-jax train {meta.get('run_dir')} step {meta.get('step')}",
             "ldm_jax_weights": "ema" if ema else "raw", "ldm_jax_lora_targets": step_cfg.lora_targets,
             "ss_resolution": f"({resolution}, {resolution})" if resolution else ""}
    try:
        write_safetensors(path, tensors, lora.kohya_metadata(config, step_cfg.lora_rank, alpha, extra, conv_rank,
                                                             conv_alpha))
    except CheckpointError as e:
        raise UserError(str(e)) from None


def export_run(run_dir: str, checkpoint: str | None, preset_name: str | None, *, ema: bool = True,
               out_dir: str | None = None, log=print, prediction: str | None = None) -> str:
    """Export the latest checkpoint of RUN_DIR (on demand) as a converted directory (default RUN_DIR/model; a LoRA
    run's LoRA file, default RUN_DIR/lora.safetensors). The
    model predicts what the run trained its U-Net to (a base that guesses otherwise is loaded as the run did;
    `prediction`, --prediction, must agree)."""
    if not os.path.isdir(run_dir):
        raise UserError(f"--out {run_dir}: {'a file, ' if os.path.exists(run_dir) else ''}not a run directory")
    run_dir = os.path.abspath(run_dir)
    with Checkpoints(os.path.join(run_dir, "checkpoints"), lazy=True) as ck:
        step = ck.latest_step()
        meta = ck.read_meta(step) if step is not None else {}
        step_cfg = StepConfig(**meta.get("step_config", {}))
        out_dir = out_dir or export_path(run_dir, step_cfg)
        if not output_file(step_cfg):  # refused before anything else, as at the start of a run
            preflight.check_model_dir(out_dir)
        if step is None:
            raise UserError(f"no checkpoint in {ck.directory}")
        predicting = run_prediction(meta, prediction, f"export {run_dir}")
        sd = load_base(checkpoint, preset_name, int(meta["seed"]), predicting)
        check_same_model(meta, sd.config.to_dict(), f"export {run_dir}")
        optim = OptimConfig(**meta["optim"])
        tree, _ = ck.restore(state_shapes(sd.config, optim, step_cfg, parallel.data_mesh()), step)
    export_model(out_dir, sd, TrainState.from_dict(tree), step_cfg, ema=ema,
                 meta={"run_dir": run_dir, "step": step, "word": meta.get("run", {}).get("textual_inversion")},
                 resolution=meta.get("run", {}).get("resolution"))
    log(f"wrote step {step} ({'ema' if ema else 'raw'} weights) to {out_dir}")
    return out_dir
