"""`TrainConfig`: the settings of one `ldm-jax train` run (the CLI builds it from its flags, `train_config`; Python
callers build it directly). The optimiser's and the train step's own settings are `OptimConfig` (`state.py`) and
`StepConfig` (`step.py`); the ranges of the numbers are `limits.RANGES`, checked by `preflight.check_config`."""

from __future__ import annotations

import dataclasses

from ldm_jax.train.state import OptimConfig
from ldm_jax.train.step import StepConfig


@dataclasses.dataclass
class TrainConfig:
    data: str
    out: str
    checkpoint: str | None = None  # anything ldm_jax.load reads (None and no preset: the bundled model) ...
    preset: str | None = None  # ... or random weights of a preset (training from scratch)
    prediction: str | None = None  # "eps" / "v": what the U-Net learns (None: the base's; resumed: the run's)
    steps: int = 1000
    batch_size: int = 1  # global micro-batch (all devices, all hosts)
    resolution: int | None = None  # default: a resumed run's, else the model's own image size (512 for SD 1.x)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    step: StepConfig = dataclasses.field(default_factory=StepConfig)
    random_flip: bool = False
    allow_empty_captions: bool = False
    seed: int | None = None  # default: a resumed run's, else 0
    resume: bool = False
    save_every: int = 500
    keep: int = 3
    sample_every: int = 0
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 20
    sample_scale: float = 7.5
    precompute_latents: bool = False
    export: str = "ema"  # which weights (EMA or raw) RUN_DIR/model gets at the end
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps in this invocation
    num_workers: int = 2
    progress: bool = True
