"""The allowed range of every number training takes, in one table.

Three places check them, all through `check`: the `ldm-jax train` CLI (before anything loads, named by flag),
`preflight.check_config` (a `config.TrainConfig` built in Python) and `OptimConfig` / `StepConfig` (named by field).
The table is keyed by the CLI flag's name (`--adam-betas` -> "adam_betas"); `FIELDS` maps the config fields that
hold the same number to it.

    check("lr", -1.0, "--lr")   # ValueError: --lr must be > 0, got -1.0
"""

from __future__ import annotations

import dataclasses
import math
import numbers


@dataclasses.dataclass(frozen=True)
class Range:
    low: float
    high: float | None = None  # None: unbounded above
    low_ok: bool = True  # the bounds themselves are allowed
    high_ok: bool = True
    integer: bool = False

    def admits(self, value) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low or (self.low_ok and value == self.low)
        below = self.high is None or value < self.high or (self.high_ok and value == self.high)
        return above and below

    def describe(self) -> str:
        low, high = (self._show(b) for b in (self.low, self.high))
        if self.high is None:
            return f"{'>=' if self.low_ok else '>'} {low}"
        return f"in {'[' if self.low_ok else '('}{low}, {high}{']' if self.high_ok else ')'}"

    def _show(self, bound) -> str:
        return str(int(bound)) if self.integer and bound is not None else f"{bound:g}" if bound is not None else ""


_COUNT, _AT_LEAST_0 = Range(1, integer=True), Range(0, integer=True)
_PROBABILITY, _DECAY = Range(0.0, 1.0), Range(0.0, 1.0, high_ok=False)
_POSITIVE, _NON_NEGATIVE = Range(0.0, low_ok=False), Range(0.0)

RANGES: dict[str, Range] = {
    # integers (TrainConfig and the CLI; steps also OptimConfig.total_steps, grad_accum StepConfig's)
    "steps": _COUNT, "batch_size": _COUNT, "grad_accum": _COUNT, "save_every": _COUNT, "keep": _COUNT,
    "sample_steps": _COUNT, "stop_after": _COUNT, "resolution": _COUNT, "warmup": _AT_LEAST_0,
    "sample_every": _AT_LEAST_0, "num_workers": _AT_LEAST_0, "seed": Range(0, 2**32 - 1, integer=True),
    # floats (OptimConfig and StepConfig)
    "lr": _POSITIVE, "min_lr_ratio": _PROBABILITY, "weight_decay": _NON_NEGATIVE, "adam_eps": _POSITIVE,
    "clip": _NON_NEGATIVE, "ema_decay": _DECAY, "caption_dropout": _PROBABILITY, "snr_gamma": _POSITIVE,
    "multires_noise": _DECAY, "noise_offset": _PROBABILITY,
    "input_perturbation": _PROBABILITY, "adam_betas": _DECAY, "lora_rank": _AT_LEAST_0,
    "lora_alpha": _POSITIVE, "lora_conv_rank": _AT_LEAST_0, "lora_conv_alpha": _POSITIVE, "num_class_images": _COUNT,
    "prior_loss_weight": _NON_NEGATIVE, "keep_tokens": _AT_LEAST_0, "num_vectors": _COUNT,
}

# config field -> its RANGES entry, where the names differ
FIELDS = {"total_steps": "steps", "b1": "adam_betas", "b2": "adam_betas", "eps": "adam_eps"}


def check(name: str, value, label: str) -> None:
    """Raise ValueError(f"{label} must be ...") unless `value` is in RANGES[FIELDS.get(name, name)]."""
    rule = RANGES[FIELDS.get(name, name)]
    if rule.integer and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise ValueError(f"{label} must be an integer, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{label} must be a number, got {value!r}")
    if not rule.admits(value):
        raise ValueError(f"{label} must be {rule.describe()}, got {value}")


def check_flag(name: str, value) -> None:
    """`check` labelled by the `ldm-jax train` flag (--batch-size for "batch_size"), as a one-line UserError."""
    from ldm_jax.errors import UserError

    try:
        check(name, value, f"--{name.replace('_', '-')}")
    except ValueError as e:
        raise UserError(str(e)) from None


def check_fields(config, names, optional=()) -> None:
    """`check` each named field of a dataclass config, labelled by the field; those in `optional` may be None."""
    for name in names:
        value = getattr(config, name)
        if value is None and name in optional:
            continue
        check(name, value, name)
