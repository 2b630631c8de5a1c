"""Training state, optimiser and EMA of the trained parameters (the latent U-Net, optionally the text encoder).

    TrainState(step, params, ema_params, opt_state)   # a pytree: jit, sharding and orbax take it directly

- Optimiser: optax `clip_by_global_norm(clip)` then `adamw(lr_schedule, b1, b2, eps, weight_decay)`, the recipe of
  diffusers' `examples/text_to_image/train_text_to_image_flax.py` (defaults lr 1e-4, betas (0.9, 0.999), eps 1e-8,
  weight decay 1e-2, max grad norm 1.0). optax's AdamW is torch.optim.AdamW's update (decoupled weight decay,
  bias-corrected moments, eps added to sqrt(v_hat)); clipping differs from torch's `clip_grad_norm_` only when it
  triggers (torch divides by norm + 1e-6).
- Learning rate: linear warmup from 0 over `warmup` steps, then cosine decay to `lr * min_lr_ratio` at `total_steps`
  ("cosine"), a straight line to it ("linear", as diffusers' `get_scheduler("linear")` with a floor), or constant
  after the warmup ("constant"; diffusers' default schedule).
- EMA of the trained params after every optimiser step, as CompVis `ldm/modules/ema.py` (LitEma):
  decay_n = min(decay, (1 + n) / (10 + n)) for the n-th update (`ema_warmup`), ema <- ema - (1 - decay_n)(ema - p).
- Params are the fp32 master copy; compute precision is the U-Net module's dtype (bf16 casts each kernel on use,
  gradients come back fp32). Gradient accumulation happens in `step.py` (mean of K micro-batch gradients, then one
  update), so `step` counts optimiser updates.

`params` is whatever tree trains: the U-Net, or {"unet", "text_encoder"[, "text_encoder_2"]} with `train_text_encoder`
(`step.trainable`), or the autoencoder (`autoencoder.py`); nothing in this file is U-Net specific.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from ldm_jax.train import limits

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimiser, schedule and EMA hyper-parameters (JSON-serialisable, stored with every checkpoint)."""

    lr: float = 1e-4
    warmup: int = 0
    schedule: str = "cosine"
    total_steps: int = 1000  # where the cosine reaches lr * min_lr_ratio
    min_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-2
    clip: float | None = 1.0  # global-norm clipping; None or 0: off
    ema_decay: float = 0.9999
    ema_warmup: bool = True

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        limits.check_fields(self, ("lr", "warmup", "total_steps", "min_lr_ratio", "b1", "b2", "eps", "weight_decay",
                                   "clip", "ema_decay"), optional=("clip",))


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimiser updates done
    params: Any  # trainable tree (the U-Net, or {"unet", "text_encoder"}), fp32 master copy
    ema_params: Any
    opt_state: Any

    def as_dict(self) -> dict:
        return {"step": self.step, "params": self.params, "ema_params": self.ema_params, "opt_state": self.opt_state}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(step=d["step"], params=d["params"], ema_params=d["ema_params"], opt_state=d["opt_state"])


def lr_schedule(cfg: OptimConfig) -> optax.Schedule:
    """step -> learning rate: linear warmup 0 -> lr, then cosine or linear to lr * min_lr_ratio (or constant)."""
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup) if cfg.warmup else None
    decay_steps = max(cfg.total_steps - cfg.warmup, 1)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, cfg.lr * cfg.min_lr_ratio, decay_steps)
    else:
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    if warmup is None:
        return after
    return optax.join_schedules([warmup, after], [cfg.warmup])


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return optax.chain(optax.clip_by_global_norm(cfg.clip), adamw) if cfg.clip else adamw


def init_state(params, cfg: OptimConfig, sharding=None) -> TrainState:
    """A fresh state at step 0, made by one compiled program on the devices of `params` (or placed by `sharding`,
    e.g. `parallel.replicated(mesh)`): fp32 copies of the params and of the EMA (new buffers, never the caller's, so
    the state can be donated) and the optimiser state. No host copies: at SD 1.x size the state is 4 x 3.4 GB."""
    return _jitted_init(cfg, sharding)(params)


@functools.lru_cache(maxsize=4)
def _jitted_init(cfg: OptimConfig, sharding):
    tx = make_optimizer(cfg)

    def init(params):
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
        ema = jax.tree_util.tree_map(lambda x: x * 1.0, params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema, opt_state=tx.init(params))

    return jax.jit(init, out_shardings=sharding)


def abstract_state(abstract_params, cfg: OptimConfig) -> TrainState:
    """The state's shapes and dtypes (jax.ShapeDtypeStruct leaves) without allocating anything."""
    shapes = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), abstract_params)
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=shapes, ema_params=shapes,
                      opt_state=jax.eval_shape(make_optimizer(cfg).init, shapes))


def ema_decay_at(cfg: OptimConfig, n) -> jax.Array:
    """The decay used by the n-th EMA update (n >= 1), CompVis LitEma."""
    decay = jnp.float32(cfg.ema_decay)
    if cfg.ema_warmup:
        n = jnp.asarray(n, jnp.float32)
        decay = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
    return decay


def apply_gradients(state: TrainState, grads, cfg: OptimConfig) -> tuple[TrainState, dict]:
    """One optimiser update and one EMA update; returns the new state and {"grad_norm", "lr", "ema_decay"}."""
    tx = make_optimizer(cfg)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    decay = ema_decay_at(cfg, step)
    ema = jax.tree_util.tree_map(lambda e, p: e - (1.0 - decay) * (e - p), state.ema_params, params)
    info = {"grad_norm": optax.tree.norm(grads), "lr": lr_schedule(cfg)(state.step), "ema_decay": decay}
    return TrainState(step=step, params=params, ema_params=ema, opt_state=opt_state), info
