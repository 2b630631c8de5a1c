"""Checks a training run makes before it writes anything, and the one-line error an out-of-memory failure becomes.

- `check_config`: the numbers of a `config.TrainConfig` (each refused with the `ldm-jax train` flag that sets it).
- `check_run_dir`: RUN_DIR (--out) is not a file, not the --data folder or inside it, writable, and its `model/`
  (where the trained model is exported at the end) is absent, empty or an ldm-jax converted directory, so that a
  long run never ends refusing to write its result.
- `resume_settings` / `changed_settings`: on --resume, the seed and the resolution (which fix the data order, the
  random keys and the model's image size) must be those of the run, or left out; other settings that change what is
  trained (batch size, learning rate, ...) may differ and are named in a note.
- `check_fits` / `oom_as_user_error`: the compiled step's memory (XLA's `memory_analysis()`, as `bench --train`)
  against the memory available before it runs, and a `RESOURCE_EXHAUSTED` from XLA as one line with a hint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import jax

from ldm_jax.errors import UserError
from ldm_jax.output_dirs import check_can_write_dir
from ldm_jax.train import limits

OOM_HINT = "lower --resolution or --batch-size (--grad-accum N keeps the images per update), or add --remat"

# {section of the checkpoint's metadata: {field: the `ldm-jax train` flag that sets it}}
FLAGS = {
    "base": {"checkpoint": "--checkpoint", "preset": "--preset"},  # the frozen VAE / text encoder come from it
    "optim": {"lr": "--lr", "warmup": "--warmup", "schedule": "--lr-schedule", "total_steps": "--steps",
              "min_lr_ratio": "--min-lr-ratio", "b1": "--adam-betas", "b2": "--adam-betas", "eps": "--adam-eps",
              "weight_decay": "--weight-decay", "clip": "--clip", "ema_decay": "--ema-decay",
              "ema_warmup": "--no-ema-warmup"},
    "step_config": {"caption_dropout": "--caption-dropout", "grad_accum": "--grad-accum", "precision": "--precision",
                    "remat": "--remat", "attention_impl": "attention_impl", "snr_gamma": "--snr-gamma",
                    "train_text_encoder": "--train-text-encoder", "debiased_loss": "--debiased-loss",
                    "multires_noise": "--multires-noise", "noise_offset": "--noise-offset",
                    "input_perturbation": "--input-perturbation", "lora_rank": "--lora-rank",
                    "lora_alpha": "--lora-alpha", "lora_targets": "--lora-targets",
                    "lora_conv_alpha": "--lora-conv-alpha"},
    "run": {"batch_size": "--batch-size", "random_flip": "--random-flip", "random_crop": "--random-crop",
            "shuffle_caption": "--shuffle-caption", "keep_tokens": "--keep-tokens",
            "processes": "processes",
            "devices": "devices", "instance_prompt": "--instance-prompt", "class_data": "--class-data",
            "class_prompt": "--class-prompt", "num_class_images": "--num-class-images",
            "prior_loss_weight": "--prior-loss-weight"},
}


def check_config(cfg) -> None:
    """Refuse out-of-range numbers of a `config.TrainConfig` with one line naming the flag."""
    for name in ("steps", "batch_size", "save_every", "keep", "sample_steps", "sample_every", "num_workers",
                 "stop_after", "resolution", "seed", "num_class_images", "prior_loss_weight", "keep_tokens"):
        value = getattr(cfg, name)
        if value is None and name in ("stop_after", "resolution", "seed"):
            continue
        limits.check_flag(name, value)
    if not (isinstance(cfg.sample_scale, (int, float)) and math.isfinite(cfg.sample_scale)):
        raise UserError(f"the sample guidance scale must be a finite number, got {cfg.sample_scale}")
    if cfg.export not in ("ema", "raw", "none"):
        raise UserError(f"--export must be one of ema, raw, none, got {cfg.export!r}")
    if cfg.sample_every and not cfg.sample_prompts:
        raise UserError("--sample-every needs at least one --sample-prompt")
    if cfg.sample_prompts and not cfg.sample_every:  # else the prompts would be silently unused
        raise UserError("--sample-prompt needs --sample-every N (draw the sample images every N steps)")
    if (cfg.class_data is None) != (cfg.class_prompt is None):
        raise UserError("--class-data DIR and --class-prompt TEXT go together (DreamBooth's prior preservation: class "
                        "images, generated with the class prompt where DIR holds fewer than --num-class-images)")
    if cfg.class_data is not None:
        cls = os.path.realpath(cfg.class_data)
        for name, path, inside_ok in (("--data", cfg.data, False), ("--out", cfg.out, True)):
            other = os.path.realpath(path) if path else None  # RUN_DIR/class is fine; samples in class/ are not
            if other and (cls == other or other.startswith(cls + os.sep)
                          or (not inside_ok and cls.startswith(other + os.sep))):
                raise UserError(f"--class-data {cfg.class_data} and the {name} folder {path} overlap (images are "
                                "searched recursively); give the class images a folder of their own")
        if os.path.exists(cfg.class_data) and not os.path.isdir(cfg.class_data):
            raise UserError(f"--class-data {cfg.class_data} is a file, not a folder")
    if (cfg.textual_inversion is None) != (cfg.init_word is None):
        raise UserError("--textual-inversion WORD and --init-word WORD0 go together (the new word's vectors start as "
                        "the embedding of WORD0, one CLIP token such as 'dog' or 'painting')")
    if (cfg.textual_inversion is not None) != bool(cfg.step.textual_inversion):
        raise UserError("--textual-inversion WORD and the step's vector count (StepConfig.textual_inversion) go "
                        "together")
    if cfg.keep_tokens and not cfg.shuffle_caption:
        raise UserError("--keep-tokens N keeps the first N tags in place when --shuffle-caption shuffles the rest: "
                        "give --shuffle-caption too")
    if cfg.shuffle_caption and cfg.precompute_latents and not cfg.step.train_text_encoder:
        raise UserError("--shuffle-caption and --precompute-latents do not go together: the cache holds each caption's "
                        "text embedding once; use one of them (or --train-text-encoder, whose captions are encoded "
                        "in the step)")
    if cfg.random_crop and cfg.precompute_latents:
        raise UserError("--random-crop and --precompute-latents do not go together: the cache holds one (centre) crop "
                        "of each image; use one of them")
    if cfg.aspect_buckets and cfg.class_data is not None:
        raise UserError("--aspect-buckets and --class-data do not go together yet (each micro-batch stacks instance "
                        "and class images, which must then share a bucket); use one of them")
    for name, text in (("--instance-prompt", cfg.instance_prompt), ("--class-prompt", cfg.class_prompt)):
        if text is not None and not text.strip():
            raise UserError(f"{name} is empty; give the caption text")


def check_run_dir(run_dir: str, data_dir: str | None, export: str, output_file: str | None = None) -> None:
    """Refuse (before any work) a RUN_DIR that is a file, the data folder or inside it, not writable, or whose
    model/ (a run writing a file instead, `export.output_file`: that file) would be refused by the export."""
    if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        raise UserError(f"--out {run_dir} is a file, not a run directory; give a directory path (new or a run's)")
    real = os.path.realpath(run_dir)  # `run_dir` as given, for the messages
    if data_dir is not None:
        data = os.path.realpath(data_dir)
        if real == data or real.startswith(data.rstrip(os.sep) + os.sep):
            raise UserError(f"--out {run_dir} is {'the' if real == data else 'inside the'} --data folder {data_dir}: "
                            "the run's samples would mix with the training images; choose a directory outside it")
    check_can_write_dir(run_dir, f"--out {run_dir}")
    if export != "none" and output_file:
        if os.path.isdir(os.path.join(run_dir, output_file)):
            raise UserError(f"{os.path.join(run_dir, output_file)} is a directory; the training result is written "
                            "there at the end: remove it, or pass --export none")
    elif export != "none":
        check_model_dir(os.path.join(run_dir, "model"), "or pass --export none")


def check_shared_run_dir(run_dir: str) -> None:
    """Multi-host: every process must see the same RUN_DIR (a file system all hosts share): orbax writes each
    checkpoint there from all processes together, and with a directory per host it waited forever. Process 0
    leaves a file there that every process looks for; the directory is removed again if it was new and the check
    fails."""
    import uuid

    from ldm_jax import parallel

    created = not os.path.exists(run_dir)
    probe = os.path.join(run_dir, f".ldm-jax-shared-{uuid.uuid4().hex}")

    def leave_probe() -> str:
        os.makedirs(run_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ldm-jax: checking that every host sees this directory\n")
        return os.path.basename(probe)

    name = parallel.from_process_0("run directory probe", leave_probe, timeout_s=600)
    seen = parallel.share("run directory seen", str(int(os.path.exists(os.path.join(run_dir, name)))), 600)
    if jax.process_index() == 0:
        try:
            os.remove(probe)
            if "0" in seen and created:
                os.rmdir(run_dir)
        except OSError:
            pass
    blind = [str(i) for i, s in enumerate(seen) if s != "1"]
    if blind:
        raise UserError(f"--out {run_dir}: process(es) {', '.join(blind)} do not see the directory process 0 writes; "
                        "a multi-host run needs one RUN_DIR on a file system every host shares (same path)")


def check_model_dir(model_dir: str, alternative: str = "") -> None:
    """The trained model is exported to `model_dir`, replacing an earlier export: refuse anything else there."""
    from convert.orbax_io import is_converted_dir

    fix = f"move it away, choose another --out{', ' + alternative if alternative else ''}"
    if os.path.islink(model_dir) or (os.path.lexists(model_dir) and not os.path.isdir(model_dir)):
        raise UserError(f"{model_dir} exists and is not a directory; the trained model is written there: {fix}")
    if os.path.isdir(model_dir) and os.listdir(model_dir) and not is_converted_dir(model_dir):
        raise UserError(f"{model_dir} exists and is not an ldm-jax converted directory (the trained model is written "
                        f"there at the end, replacing only an earlier export): {fix}")


def resume_settings(meta: dict, cfg, where: str) -> tuple[int, int | None]:
    """(seed, resolution) of the run being resumed; refuses a --seed, --resolution, --aspect-buckets,
    --train-text-encoder or LoRA setting that differs from the run's (None in `cfg` means: the run's own)."""
    seed = int(meta["seed"])
    resolution = (meta.get("run") or {}).get("resolution")
    if cfg.seed is not None and cfg.seed != seed:
        raise UserError(f"{where}: the run was started with --seed {seed}, not {cfg.seed} (it fixes the data order "
                        "and every random draw); leave --seed out or give the same, or train into a new --out")
    if cfg.resolution is not None and resolution is not None and cfg.resolution != resolution:
        raise UserError(f"{where}: the run trains at --resolution {resolution}, not {cfg.resolution}; leave "
                        "--resolution out or give the same, or start a new --out from its model "
                        "(`--export-only`, then --checkpoint RUN_DIR/model)")
    was_bucketed = bool((meta.get("run") or {}).get("aspect_buckets"))
    if was_bucketed != cfg.aspect_buckets:  # the data order and every crop depend on it
        raise UserError(f"{where}: the run was started {'with' if was_bucketed else 'without'} --aspect-buckets; "
                        "resume it the same way")
    was_joint = bool((meta.get("step_config") or {}).get("train_text_encoder"))
    if was_joint != cfg.step.train_text_encoder:
        raise UserError(f"{where}: the run was started {'with' if was_joint else 'without'} --train-text-encoder; "
                        "resume it the same way")
    step = meta.get("step_config") or {}
    word = ((meta.get("run") or {}).get("textual_inversion"), int(step.get("textual_inversion", 0)))
    if word != (cfg.textual_inversion, cfg.step.textual_inversion):
        run = f"the word {word[0]!r} ({word[1]} vectors)" if word[0] else "no --textual-inversion word"
        raise UserError(f"{where}: the run trains {run}; resume it with the same --textual-inversion and "
                        "--num-vectors")
    was = (int(step.get("lora_rank", 0)), step.get("lora_targets", "attn") if step.get("lora_rank") else None,
           int(step.get("lora_conv_rank", 0)))
    now = (cfg.step.lora_rank, cfg.step.lora_targets if cfg.step.lora_rank else None, cfg.step.lora_conv_rank)
    if was != now:
        convs = f" and conv rank {was[2]}" if was[2] else ""
        run = (f"a LoRA of rank {was[0]}{convs} on --lora-targets {was[1]}" if was[0]
               else "the whole U-Net (no --lora-rank)")
        raise UserError(f"{where}: the run trains {run}; resume it with the same --lora-rank, --lora-conv-rank and "
                        "--lora-targets")
    return seed, resolution


def changed_settings(meta: dict, now: dict, defaults: dict) -> list[str]:
    """'--flag OLD -> NEW' for each setting in `now` ({section: {field: value}}, sections of FLAGS) that differs from
    the checkpoint's `meta` (`defaults` for fields an older checkpoint lacks). The cosine length (--steps) and floor
    are left out when the schedule is constant before and after: they do not enter it."""
    now, defaults = json.loads(json.dumps(now)), json.loads(json.dumps(defaults))  # tuples -> lists, as stored
    constant = (now.get("optim", {}).get("schedule") == "constant"
                and (meta.get("optim") or {}).get("schedule", "cosine") == "constant")
    out: dict[str, list] = {}
    for section, fields in now.items():
        for field, value in fields.items():
            if constant and field in ("total_steps", "min_lr_ratio"):
                continue
            old = (meta.get(section) or {}).get(field, defaults.get(section, {}).get(field))
            if old != value:
                flag = FLAGS.get(section, {}).get(field, field)
                out.setdefault(flag, [[], []])
                out[flag][0].append(old)
                out[flag][1].append(value)
    return [f"{flag} {_show(old)} -> {_show(new)}" for flag, (old, new) in out.items()]


def _show(values: list) -> str:
    return " ".join("off" if v is None else str(v) for v in values)


# ------------------------------------------------------------------------------------------------ memory


def _available_bytes(device) -> int | None:
    """Free memory for `device`: the allocator's limit minus what is in use (GPU/TPU), or the host's MemAvailable
    (CPU, whose devices all share it). None when unknown."""
    if device.platform != "cpu":
        try:
            stats = device.memory_stats() or {}
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        except (KeyError, TypeError, ValueError, RuntimeError):
            return None
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def check_fits(compiled, what: str) -> None:
    """Refuse to run a compiled step whose new buffers (outputs not aliasing donated inputs, plus temporaries: the
    arguments are already in memory) exceed the memory available now; nothing is refused when either is unknown."""
    try:
        m = compiled.memory_analysis()
        need = m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    except Exception:  # noqa: BLE001 - not every backend reports it
        return
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        need *= len(jax.local_devices())  # simulated CPU devices share the host's memory
    available = _available_bytes(device)
    if available is not None and need > available:
        raise UserError(f"not enough memory for the train step ({what}): it needs ~{_gib(need)} more, "
                        f"{_gib(available)} {'are' if device.platform == 'cpu' else 'is'} free on "
                        f"{'the host' if device.platform == 'cpu' else device.device_kind}; {OOM_HINT}")


def is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(e)


@contextlib.contextmanager
def oom_as_user_error(what):
    """XLA's RESOURCE_EXHAUSTED inside the block -> one UserError line; `what` (a callable) describes the run."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if not is_out_of_memory(e):
            raise
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"out of memory ({what()}): {detail}; {OOM_HINT}") from None
