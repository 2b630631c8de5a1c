"""The train step: a pure function `(state, batch, key, frozen) -> (state, metrics)`, jit-compiled data-parallel.

One step = one optimiser update from K micro-batches (gradient accumulation, `lax.scan`, mean of the K gradients):

    batch  = {"images": f32 [K, B, H, W, 3] in [-1, 1], "ids": int32 [K, B, S]}          # encoded in the step, or
             {"moments": f32 [K, B, h, w, 2C], "ctx": f32 [K, B, S, d]}                  # precomputed (latent_cache)
             SDXL adds "sizes": f32 [K, B, 6] (`size_conditioning`) and, precomputed, "pooled": f32 [K, B, P];
             DreamBooth's prior preservation adds per-example loss "weights": f32 [K, B]
    key    = uint32 key data of `jax.random.key(seed)`: the step uses fold_in(key, state.step) and example i of the
             step's global batch fold_in(step_key, i) (loss.py), so nothing depends on the device or host count
    frozen = {"vae": params, "text_encoder": params, "uncond_ids": int32 [1, S]}  (never differentiated)

`state.params` is the U-Net's tree, or with `train_text_encoder` {"unet", "text_encoder"[, "text_encoder_2"]}
(`trainable`, `components`): the CLIP text encoder(s) are then trained jointly, as the LDM paper trains tau_theta
with eps_theta (eq. 3), the context (and the empty prompt's, for caption dropout) is computed from the ids inside the
differentiated loss, and a precomputed batch carries {"moments", "ids"}. With `lora_rank` the state holds a LoRA
({module: {"down", "up"}}, `lora.py`) and `frozen` the base U-Net; the loss runs the merged U-Net W + scale down @ up,
differentiated in the LoRA only (with `train_text_encoder` the LoRA adapts the frozen text encoder too, which then
encodes the ids inside the loss as above). With `textual_inversion` (N > 0) the state holds only a new word's N
token-embedding rows per text encoder (`textual_inversion.py`), put into the frozen encoders inside the loss.

SDXL (Podell et al. 2023; both text encoders frozen as in diffusers' `train_text_to_image_sdxl.py`, or both trained with
`train_text_encoder`, as kohya's `sdxl_train.py --train_text_encoder`): the context is the two encoders' states side
by side, and the U-Net also gets y = [pooled text, emb(original size), emb(crop top-left),
emb(target size)] (`ldm_jax.conditioning`) with each image's own sizes and crop (`data.Example`). A dropped caption
zeroes the context and the pooled text (sgm's `GeneralConditioner` with `ucg_rate`; our sampler's unconditional side
for an empty negative prompt is zeros too), never the sizes.

The loss is `loss.diffusion_loss` (Rombach et al. 2022 eq. 2; Ho et al. 2020 L_simple) on z_0 sampled from the frozen
autoencoder's posterior, as diffusers' `train_text_to_image_flax.py`; its target is the noise, or v for a
v-prediction model (`config.schedule.prediction`). Data parallelism (`compile_step`): the state
and `frozen` are replicated over the "data" mesh, the batch is sharded on its B axis; the mean over the global batch
makes XLA insert the gradient all-reduce (on every device of every host). The state is donated.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ldm_jax import parallel
from ldm_jax.conditioning import encode_text, vector_conditioning
from ldm_jax.configs import ModelConfig
from ldm_jax.errors import UserError
from ldm_jax.models.build import modules
from ldm_jax.schedules import make_schedule
from ldm_jax.train import limits, lora, loss as L
from ldm_jax.train import textual_inversion as TI
from ldm_jax.train.state import OptimConfig, TrainState, apply_gradients

DTYPES = {"fp32": jnp.float32, "float32": jnp.float32, "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the compiled step computes (besides the optimiser): JSON-serialisable."""

    caption_dropout: float = 0.1
    grad_accum: int = 1  # K micro-batches per optimiser update
    precision: str = "fp32"  # compute dtype: "fp32" or "bf16" (params stay fp32)
    remat: bool = False  # rematerialise U-Net ResBlocks / transformers in the backward pass
    attention_impl: str = "auto"
    snr_gamma: float | None = None  # min-SNR-gamma loss weighting (loss.min_snr_weight); None: plain L_simple
    train_text_encoder: bool = False  # train tau_theta jointly with the U-Net (else frozen, as SD fine-tuning)
    debiased_loss: bool = False  # also weight the loss by 1 / sqrt(SNR_t) (loss.debiased_weight)
    multires_noise: float = 0.0  # > 0: the diffusion noise is loss.multires_noise with this discount (0: white)
    noise_offset: float = 0.0  # > 0: offset noise of this strength added to the diffusion noise (`loss.draw`)
    input_perturbation: float = 0.0  # gamma > 0: z_t from eps + gamma xi, target eps (`loss.draw`, Ning et al. 2023)
    lora_rank: int = 0  # > 0: train a LoRA of this rank on the frozen U-Net (`lora.py`) instead of the U-Net
    lora_alpha: float | None = None  # the LoRA's scale is alpha / rank (None: alpha = rank, scale 1)
    lora_targets: str = "attn"  # which U-Net kernels the LoRA adapts (`lora.TARGETS`)
    lora_conv_rank: int = 0  # > 0: the LoRA also adapts the ResBlocks and resamplers, 3x3 convs at this rank
    lora_conv_alpha: float | None = None  # their scale is conv_alpha / conv_rank (None: scale 1)
    textual_inversion: int = 0  # > 0: train only this many new token-embedding rows (`textual_inversion.py`)

    def __post_init__(self):
        if self.precision not in DTYPES:
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        limits.check_fields(self, ("caption_dropout", "grad_accum", "snr_gamma", "multires_noise", "noise_offset",
                                   "input_perturbation", "lora_rank", "lora_alpha", "lora_conv_rank",
                                   "lora_conv_alpha"),
                            optional=("snr_gamma", "lora_alpha", "lora_conv_alpha"))
        lora.check_targets(self.lora_targets)
        if self.lora_conv_rank and not self.lora_rank:
            raise ValueError("a LoRA conv rank (--lora-conv-rank) needs a LoRA rank (--lora-rank)")
        if isinstance(self.textual_inversion, bool) or not isinstance(self.textual_inversion, int) \
                or self.textual_inversion < 0:
            raise ValueError(f"textual_inversion (vectors) must be an integer >= 0, got {self.textual_inversion!r}")
        if self.textual_inversion and (self.lora_rank or self.train_text_encoder):
            raise ValueError("textual inversion trains the new word's vectors only: not with --lora-rank or "
                             "--train-text-encoder")
        if self.lora_conv_alpha is not None and not self.lora_conv_rank:
            raise ValueError("--lora-conv-alpha scales the conv modules of --lora-conv-rank RC: give that too")

    @property
    def dtype(self):
        return DTYPES[self.precision]

    @property
    def encodes_text(self) -> bool:
        """Whether the text encoder runs inside the differentiated loss (its weights or new rows train)."""
        return self.train_text_encoder or self.textual_inversion > 0

    @property
    def frozen_unet(self) -> bool:
        """Whether the U-Net is a frozen input of the step (a LoRA or textual inversion trains instead)."""
        return bool(self.lora_rank or self.textual_inversion)

    @property
    def trained(self) -> tuple[str, ...]:
        """The model components the step trains (the rest are in `frozen`; with a LoRA none is: the state holds
        the LoRA and the U-Net is frozen)."""
        if self.frozen_unet:
            return ()
        return ("unet",) + lora.TEXT_COMPONENTS * self.train_text_encoder  # (the text encoders the model has)

    @property
    def lora_scale(self) -> float:
        return (self.lora_alpha or self.lora_rank) / self.lora_rank

    @property
    def lora_conv_scale(self) -> float | None:
        """The 3x3 conv modules' scale, None when the LoRA has none."""
        if not self.lora_conv_rank:
            return None
        return (self.lora_conv_alpha or self.lora_conv_rank) / self.lora_conv_rank


def trainable(model_params: dict, step_cfg: StepConfig):
    """{component: tree} of a model -> the step's `state.params` (the bare U-Net tree when only it trains). Not for
    LoRA runs, whose state starts from `lora.init` (`initial_params`)."""
    if step_cfg.train_text_encoder:
        return {c: model_params[c] for c in step_cfg.trained if c in model_params}
    return model_params["unet"]


def initial_params(sd, step_cfg: StepConfig, seed: int):
    """A new run's `state.params`: the base model's trained components, or a fresh LoRA (`lora.init`)."""
    if step_cfg.lora_rank:
        return lora.init(sd.config, step_cfg.lora_targets, step_cfg.lora_rank, seed, step_cfg.train_text_encoder,
                         step_cfg.lora_conv_rank)
    if step_cfg.textual_inversion:
        return TI.initial_rows(sd.params, sd.config, step_cfg.textual_inversion)
    return trainable(sd.params, step_cfg)


def abstract_trainable(config: ModelConfig, step_cfg: StepConfig):
    """The shapes of `initial_params` (jax.ShapeDtypeStruct leaves), without weights."""
    from ldm_jax.models.build import abstract_params, components_of

    if step_cfg.lora_rank:
        return lora.abstract(config, step_cfg.lora_targets, step_cfg.lora_rank, step_cfg.train_text_encoder,
                             step_cfg.lora_conv_rank)
    if step_cfg.textual_inversion:
        return TI.abstract_rows(config, step_cfg.textual_inversion)
    trained = tuple(c for c in step_cfg.trained if c in components_of(config))  # the text encoders the model has
    return trainable(abstract_params(config, trained), step_cfg)


def merged_unet(base_unet, lora_params, config: ModelConfig, step_cfg: StepConfig):
    """The U-Net a LoRA run's `state.params` (or EMA) make of the frozen base U-Net (`lora.merge`)."""
    return lora.merge(base_unet, lora_params, config, step_cfg.lora_targets, step_cfg.lora_scale,
                      step_cfg.lora_conv_scale)


def merged_text_encoder(base_text, lora_params, config: ModelConfig, step_cfg: StepConfig,
                        component: str = "text_encoder"):
    """A text encoder of a LoRA run with `train_text_encoder` (`lora.merge_text`)."""
    return lora.merge_text(base_text, lora_params, config, step_cfg.lora_scale, component)


def components(params, step_cfg: StepConfig) -> dict:
    """The inverse of `trainable`: `state.params` (or its EMA) -> {component: tree}."""
    return dict(params) if step_cfg.train_text_encoder else {"unet": params}


def make_train_step(config: ModelConfig, optim: OptimConfig, step_cfg: StepConfig):
    """The pure step function for this model and these hyper-parameters (see the module docstring)."""
    prediction = config.schedule.prediction
    if prediction == "v" and step_cfg.debiased_loss:
        raise UserError(L.DEBIASED_V_REFUSED)
    mods = modules(config, step_cfg.dtype, step_cfg.attention_impl, remat=step_cfg.remat)
    unet, vae, text = mods["unet"], mods["vae"], mods["text_encoder"]
    schedule = make_schedule(config.schedule)
    n_steps = config.schedule.n_steps
    sdxl = config.is_sdxl
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731

    def inputs(frozen, micro, keys):
        """A micro-batch -> (z_0, t, noise, x_noise, cond, drop, weights): x_noise is None unless input perturbation
        makes z_t from other noise than the target's (`loss.draw`); cond is {"ctx": the frozen text encoders' context
        [B, S, d]} ({"ids" [B, S]} when the text encoder trains; no gradients flow into the frozen encoders), SDXL
        adding "pooled" [B, P] and "sizes" [B, 6]."""
        if "moments" in micro:
            moments = micro["moments"]
        else:
            moments = vae.apply({"params": frozen["vae"]}, micro["images"], method="encode")
        if step_cfg.encodes_text:
            cond = {"ids": micro["ids"]}
        elif "ctx" in micro:
            cond = {name: f32(micro[name]) for name in ("ctx", "pooled") if name in micro}
        else:
            encoded = encode_text(mods, config, frozen, micro["ids"], pooled=sdxl)
            cond = {"ctx": f32(encoded[0]), "pooled": f32(encoded[1])} if sdxl else {"ctx": f32(encoded)}
        if sdxl:
            cond["sizes"] = f32(micro["sizes"])
        c = moments.shape[-1] // 2
        d = L.draw(keys, moments.shape[1:-1] + (c,), n_steps, step_cfg.caption_dropout, step_cfg.multires_noise,
                   step_cfg.noise_offset, step_cfg.input_perturbation)
        z0 = L.posterior_sample(moments, d.posterior_eps, config.latent_scale)
        return jax.lax.stop_gradient((z0, d.t, d.noise, d.x_noise, cond, d.drop, micro.get("weights")))

    def conditioning(text_params, cond, uncond, drop):
        """(tau_theta(y) [B, S, d] with the dropped captions' rows replaced by the empty prompt's context, SDXL's
        y [B, adm] or None); uncond is a context (frozen encoder) or token ids that the trained encoders
        (`text_params`, {component: tree}) encode here. SDXL: a dropped caption's context and pooled text are zeros,
        its sizes stay."""
        if step_cfg.encodes_text:
            encoded = encode_text(mods, config, text_params, cond["ids"], pooled=sdxl)
            if sdxl:
                ctx, cond = encoded[0], {**cond, "pooled": f32(encoded[1])}
            else:
                ctx, uncond = encoded, encode_text(mods, config, text_params, uncond)
        else:
            ctx = cond["ctx"]
        if not sdxl:
            return L.drop_captions(f32(ctx), uncond, drop), None
        zeros = lambda x: jnp.zeros_like(x[:1])  # noqa: E731
        pooled = L.drop_captions(cond["pooled"], zeros(cond["pooled"]), drop)
        return L.drop_captions(ctx, zeros(ctx), drop), vector_conditioning(pooled, cond["sizes"])

    def micro_loss(params, uncond, base, z0, t, noise, x_noise, cond, drop, weights):
        text_params = None
        if step_cfg.textual_inversion:  # base: the frozen model; params: the new word's rows of each text encoder
            unet_params = base["unet"]
            text_params = {c: TI.with_rows(base[c], params[c]) for c in lora.text_components(config)}
        elif step_cfg.lora_rank:  # base: the frozen U-Net (and text encoders) the LoRA adapts
            unet_params = merged_unet(base["unet"], params, config, step_cfg)
            if step_cfg.train_text_encoder:
                text_params = {c: merged_text_encoder(base[c], params, config, step_cfg, c)
                               for c in lora.text_components(config)}
        else:
            unet_params = params["unet"] if step_cfg.train_text_encoder else params
            if step_cfg.train_text_encoder:
                text_params = {c: params[c] for c in lora.text_components(config)}
        ctx, y = conditioning(text_params, cond, uncond, drop)
        extra = () if y is None else (y,)  # U-Nets without a vector conditioning take (x, t, c)
        eps_fn = lambda x, tt, c: unet.apply({"params": unet_params}, x, tt, c, *extra)  # noqa: E731
        return L.diffusion_loss(eps_fn, schedule, z0, t, noise, ctx, step_cfg.snr_gamma, step_cfg.debiased_loss,
                                prediction, weights, x_noise)

    grad_fn = jax.value_and_grad(micro_loss)

    def train_step(state: TrainState, batch: dict, key, frozen: dict):
        step_key = jax.random.fold_in(jax.random.wrap_key_data(key), state.step)
        uncond = frozen["uncond_ids"]  # the empty prompt: its ids, or its context once per step when frozen
        if not step_cfg.encodes_text and not sdxl:  # SDXL's is zeros
            uncond = text.apply({"params": frozen["text_encoder"]}, uncond)
        k, b = jax.tree_util.tree_leaves(batch)[0].shape[:2]

        def one(i, micro):
            keys = L.example_keys(step_key, i * b + jnp.arange(b))
            base = ({c: frozen[c] for c in ("unet",) + lora.TEXT_COMPONENTS if c in frozen} if step_cfg.frozen_unet
                    else None)
            return grad_fn(state.params, uncond, base, *inputs(frozen, micro, keys))

        if k == 1:
            loss, grads = one(0, jax.tree_util.tree_map(lambda x: x[0], batch))
        else:
            def body(carry, xs):
                loss_i, grads_i = one(*xs)
                return jax.tree_util.tree_map(jnp.add, carry, (loss_i, grads_i)), None

            zero = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(body, zero, (jnp.arange(k), batch))
            loss, grads = jax.tree_util.tree_map(lambda x: x / k, (loss, grads))
        new_state, info = apply_gradients(state, grads, optim)
        return new_state, {"loss": loss, **info}

    return train_step


# ------------------------------------------------------------------------------------------------ sharding


def batch_sharding(mesh=None) -> NamedSharding:
    """[K, B, ...] arrays: B split over the data axis."""
    return NamedSharding(mesh or parallel.data_mesh(), P(None, parallel.DATA_AXIS))


def abstract_cached_batch(sd, step_cfg: StepConfig, batch_size: int, resolution: int, mesh=None,
                          weights: bool = False) -> dict:
    """The step's `batch` argument as `latent_cache` rows give it ({"moments", "ctx"}, or {"moments", "ids"} when
    the text encoder trains; global shapes and shardings, as `shard_batch`), without data: to compile the step and
    check its memory before the cache is built. `batch_size`: rows per micro-batch (with `weights`, DreamBooth's
    instance and class rows together)."""
    sharding = batch_sharding(mesh)

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct((step_cfg.grad_accum, batch_size) + tuple(shape), dtype, sharding=sharding)

    ids = jax.ShapeDtypeStruct((1, sd.config.text.max_length), jnp.int32)
    pixels = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
    out = {"moments": spec(jax.eval_shape(sd.encode_moments, sd.params, pixels).shape[1:], jnp.float32)}
    if step_cfg.train_text_encoder:
        out["ids"] = spec(ids.shape[1:], jnp.int32)
    elif sd.config.is_sdxl:
        ctx, pooled = jax.eval_shape(functools.partial(sd.encode_text, pooled=True), sd.params, ids)
        out.update(ctx=spec(ctx.shape[1:], jnp.float32), pooled=spec(pooled.shape[1:], jnp.float32))
    else:
        out["ctx"] = spec(jax.eval_shape(sd.encode_text, sd.params, ids).shape[1:], jnp.float32)
    if sd.config.is_sdxl:
        out["sizes"] = spec((6,), jnp.float32)
    if weights:
        out["weights"] = spec((), jnp.float32)
    return out


def size_conditioning(rows: dict, target) -> np.ndarray:
    """SDXL's size numbers of a loader batch: float32 [B, 6] = original (h, w), crop (top, left), target (h, w)
    (the order of `conditioning.size_numbers`); `target`: the crop, a square side or (height, width) of a bucket."""
    target = np.broadcast_to(np.asarray(target, np.int32), (len(rows["original_sizes"]), 2))
    return np.concatenate([rows["original_sizes"], rows["crop_top_left"], target], axis=1).astype(np.float32)


def shard_batch(local: dict, mesh=None) -> dict:
    """This process's rows {name: [K, b_local, ...]} -> global arrays [K, b_local * processes, ...] sharded on B."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return {k: jax.device_put(np.asarray(v), sharding) for k, v in local.items()}
    out = {}
    for name, v in local.items():
        v = np.asarray(v)
        shape = (v.shape[0], v.shape[1] * jax.process_count()) + v.shape[2:]
        out[name] = jax.make_array_from_process_local_data(sharding, v, shape)
    return out


def key_data(seed: int) -> np.ndarray:
    """uint32 key data of `jax.random.key(seed)` (what the step's `key` argument takes)."""
    return np.asarray(jax.random.key_data(jax.random.key(int(seed))))


def compile_step(step_fn, mesh=None, donate: bool = True):
    """jit with replicated state / key / frozen and a B-sharded batch; the state is donated."""
    from ldm_jax.compile_cache import enable_compilation_cache

    enable_compilation_cache()  # a new process (a resumed run, another host) reuses the compiled step from disk
    mesh = mesh or parallel.data_mesh()
    rep = parallel.replicated(mesh)
    return jax.jit(step_fn, in_shardings=(rep, batch_sharding(mesh), rep, rep), out_shardings=(rep, rep),
                   donate_argnums=(0,) if donate else ())


def jitted_train_step(config: ModelConfig, optim: OptimConfig, step_cfg: StepConfig, mesh=None):
    """`compile_step(make_train_step(...))`, memoised per (model, hyper-parameters, mesh): runs in one process that
    use the same settings (a resumed run, tests) share one traced and compiled program."""
    if optim.schedule == "constant":  # the run length does not enter the program
        optim = dataclasses.replace(optim, total_steps=1, min_lr_ratio=0.0)
    return _jitted_train_step(config, optim, step_cfg, mesh or parallel.data_mesh())


@functools.lru_cache(maxsize=4)
def _jitted_train_step(config, optim, step_cfg, mesh):
    return compile_step(make_train_step(config, optim, step_cfg), mesh)


def frozen_inputs(params: dict, uncond_ids, mesh=None, unet: bool = False) -> dict:
    """The replicated frozen inputs of the step from a model's params (the VAE, and the text encoder unless it
    trains: whichever `params` holds; with `unet`, a LoRA run's base U-Net) and the tokenized empty prompt [1, S]."""
    tree = {c: params[c] for c in ("vae", "text_encoder", "text_encoder_2") + ("unet",) * unet if c in params}
    tree["uncond_ids"] = np.asarray(uncond_ids, np.int32).reshape(1, -1)
    return parallel.replicate(tree, mesh)
