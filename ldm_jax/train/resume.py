"""Restoring a run's checkpointed `TrainState`: `state_shapes` (the abstract state, replicated on the mesh, that orbax
restores into; also used by `export.export_run`) and `resume_state` (--resume: the state of the latest checkpoint, and
a note naming the settings that differ from the checkpoint's, which make the continuation not bit-exact).

The checks that come before (a RUN_DIR with checkpoints needs --resume, a resumed run keeps its seed, resolution and
model) are in `loop._train`, `preflight.resume_settings` and `checkpoint.check_same_model`."""

from __future__ import annotations

import dataclasses

import jax

from ldm_jax import parallel
from ldm_jax.train import preflight
from ldm_jax.train.base import base_info
from ldm_jax.train.config import TrainConfig
from ldm_jax.train.state import OptimConfig, TrainState, abstract_state
from ldm_jax.train.step import StepConfig, abstract_trainable


def state_shapes(config, optim: OptimConfig, step_cfg: StepConfig, mesh):
    shapes = abstract_state(abstract_trainable(config, step_cfg), optim).as_dict()
    return parallel.abstract_like(shapes, parallel.replicated(mesh))


def resume_state(ck, step: int, meta: dict, config, cfg: TrainConfig, mesh, run_dir: str, log) -> TrainState:
    """The state of checkpoint `step` (whose metadata is `meta`) of `ck`, restored onto `mesh`; logs the resume and
    a note naming the settings of `cfg` that differ from the checkpoint's."""
    state = TrainState.from_dict(ck.restore(state_shapes(config, cfg.optim, cfg.step, mesh), step)[0])
    log(f"resuming {run_dir} at step {step} (data position {meta['data']['position']})")
    # (another number of processes or devices: other rounding, so not a bit-exact continuation either)
    now = {"base": base_info(cfg), "optim": dataclasses.asdict(cfg.optim),
           "step_config": dataclasses.asdict(cfg.step),
           "run": {"batch_size": cfg.batch_size, "random_flip": cfg.random_flip, "random_crop": cfg.random_crop,
                   "shuffle_caption": cfg.shuffle_caption, "keep_tokens": cfg.keep_tokens,
                   "processes": jax.process_count(), "devices": int(mesh.devices.size)}}
    defaults = {"base": now["base"], "optim": dataclasses.asdict(OptimConfig()),  # the values of keys older runs lack
                "step_config": dataclasses.asdict(StepConfig()),
                "run": {**now["run"], "random_crop": False, "shuffle_caption": False, "keep_tokens": 0}}
    changed = preflight.changed_settings(meta, now, defaults)
    if changed:
        log(f"note: settings differ from the checkpoint's ({', '.join(changed)}); the run continues with the "
            "new ones (not a bit-exact continuation)")
    return state
