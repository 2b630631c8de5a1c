"""The training loop: captioned images -> (latents, text embeddings) -> train steps -> metrics, checkpoints, samples,
and at the end the trained model as a converted directory (RUN_DIR/model, readable by `ldm_jax.load` and
`ldm-jax export`).

The use case is diffusers' `examples/text_to_image/train_text_to_image_flax.py` (fine-tune the U-Net of a Stable
Diffusion checkpoint on a folder of captioned images); the objective is Rombach et al. 2022 eq. 2 (`loss.py`). Runs
on every device of every host (`parallel.data_mesh()`): `batch_size` is the global micro-batch, each host loads its
rows (`data.batches(shard_index=process, num_shards=processes)`), K = `grad_accum` micro-batches make one update.
Around the loop: the settings (`config.TrainConfig`), the starting model (`base.py`), restoring a checkpoint
(`resume.py`), the sample images (`samples.py`) and the exported model (`export.py`).

RUN_DIR layout: checkpoints/<step>/ (orbax, `checkpoint.py`), metrics.jsonl (one JSON object per step), samples/
(PNG with prompt/seed/step metadata), model/ (converted directory with the EMA weights, or the raw ones),
latent_cache/. The trained components are the U-Net, and the text encoder with `StepConfig.train_text_encoder`
(SD 1.x/2.x; SDXL trains its U-Net, with each image's size and crop as its size conditioning, `step.py`).

Exact resume: the state (params, EMA, optimiser), the step (which fixes every random key), the seed and the data
position are checkpointed; resuming with the same settings continues bit for bit. A resumed run keeps its seed and
resolution (another one is refused, `preflight.resume_settings`); other changed settings are named in a note
(`resume.resume_state`). A Ctrl-C saves a checkpoint whose state, step, data position and metrics rows agree
(`progress.InterruptGuard`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import jax
import numpy as np

from ldm_jax import parallel
from ldm_jax.errors import UserError
from ldm_jax.train import buckets as B
from ldm_jax.train import data as D
from ldm_jax.train import dreambooth
from ldm_jax.train import preflight
from ldm_jax.train.base import (base_info, check_resolution, check_trainable, load_base, prediction_line,
                                run_prediction, size_multiple)
from ldm_jax.train.checkpoint import Checkpoints, check_same_model
from ldm_jax.train.config import TrainConfig
from ldm_jax.train import textual_inversion as TI
from ldm_jax.train.export import export_model, export_path, output_file, result_kind
from ldm_jax.train.progress import InterruptGuard, Metrics, progress_bar
from ldm_jax.train.resume import resume_state
from ldm_jax.train.samples import check_sample_steps, samples_missing, save_samples
from ldm_jax.train.state import init_state
from ldm_jax.train.step import (abstract_cached_batch, frozen_inputs, jitted_train_step, key_data, shard_batch,
                                 initial_params, size_conditioning)


DREAMBOOTH_FIELDS = ("instance_prompt", "class_data", "class_prompt", "num_class_images", "prior_loss_weight")


def train(cfg: TrainConfig, log=print) -> dict:
    """Run (or resume) training as configured; returns {"step", "loss" (None: no step to train), "run_dir",
    "model_dir"}.

    Bad settings, data, RUN_DIR (or its model/), a --resume that changes the seed or resolution, and a step that
    cannot fit in the free memory are refused (UserError) before anything is written to RUN_DIR; its files appear
    with the first step's metrics row and checkpoint (the latent cache of --precompute-latents before the step)."""
    from ldm_jax.compile_cache import enable_compilation_cache

    preflight.check_config(cfg)
    dataset = D.scan_dataset(cfg.data, allow_empty_captions=cfg.allow_empty_captions, caption=cfg.instance_prompt)
    preflight.check_run_dir(cfg.out, cfg.data, cfg.export, output_file(cfg.step))
    run_dir = os.path.abspath(cfg.out)
    if cfg.batch_size > len(dataset):
        raise UserError(f"--batch-size {cfg.batch_size} is more than the {len(dataset)} images in {cfg.data} (a batch "
                        "holds distinct images of one epoch); lower --batch-size (--grad-accum N adds up N batches "
                        "per update)")
    if jax.process_count() > 1:
        preflight.check_shared_run_dir(run_dir)
    enable_compilation_cache()
    ck = Checkpoints(os.path.join(run_dir, "checkpoints"), keep=cfg.keep, lazy=True)
    try:
        return _train(cfg, dataset, run_dir, ck, log)
    finally:
        ck.close()


def _train(cfg, dataset, run_dir, ck, log):
    latest = ck.latest_step()
    if latest is not None and not cfg.resume:
        raise UserError(f"{run_dir} already holds checkpoints (latest step {latest}); pass --resume to continue "
                        "or choose a new --out directory")
    if cfg.resume and latest is None:
        raise UserError(f"--resume: no checkpoint in {ck.directory}")
    meta = ck.read_meta(latest) if latest is not None else None
    if meta:
        seed, res = preflight.resume_settings(meta, cfg, f"--resume {run_dir}")
    else:
        seed, res = 0 if cfg.seed is None else cfg.seed, None
    prediction = run_prediction(meta, cfg.prediction, f"--resume {run_dir}") if meta else cfg.prediction
    sd = load_base(cfg.checkpoint, cfg.preset, seed, prediction)
    check_trainable(sd.config)
    line = prediction_line(sd, "the run's" if meta else cfg.prediction and "--prediction")
    if line:
        log(line)
    config_dict = sd.config.to_dict()
    if meta:
        check_same_model(meta, config_dict, f"--resume {run_dir}")
    if res is None:  # not a resumed run's: the one asked for, else the model's own
        res = sd.config.image_size if cfg.resolution is None else cfg.resolution
    check_resolution(sd.config, res)
    if cfg.textual_inversion is not None:  # the word's new ids and rows (after the base's config is checked)
        sd = TI.add_word(sd, cfg.textual_inversion, cfg.init_word, cfg.step.textual_inversion)
        TI.check_captions(sd, dataset.captions, cfg.textual_inversion, cfg.step.textual_inversion)
    buckets = None
    if cfg.aspect_buckets:  # before the state: a data set without one step's images in any bucket is refused first
        log(f"sorting {len(dataset)} images into aspect-ratio buckets ...")
        buckets = B.plan(dataset.paths, res, size_multiple(sd.config))
        log(f"aspect-ratio buckets (width x height: images): {buckets.summary()}")
        B.check_batches(buckets, cfg.batch_size * cfg.step.grad_accum,
                        f"--batch-size {cfg.batch_size} x --grad-accum {cfg.step.grad_accum}")
    check_sample_steps(sd.config, cfg)
    if meta and cfg.steps < latest:
        raise UserError(f"--resume {run_dir}: the run is at step {latest}, past --steps {cfg.steps}; give --steps "
                        f"above {latest} to train on (or `--export-only` to export step {latest})")
    cfg = dataclasses.replace(cfg, seed=seed, resolution=res)
    mesh, n_proc = parallel.data_mesh(), jax.process_count()
    if cfg.batch_size % mesh.devices.size:
        raise UserError(f"--batch-size {cfg.batch_size} must be a multiple of the device count {mesh.devices.size}")
    k = cfg.step.grad_accum
    class_data = None
    if cfg.class_data:  # DreamBooth's prior preservation: class images from the base model, made before the state
        dreambooth.ensure_class_images(sd.replace(dtype=cfg.step.dtype), cfg.class_data, cfg.class_prompt,
                                       cfg.num_class_images, res, seed, log)
        class_data = dreambooth.class_dataset(cfg.class_data, cfg.class_prompt, cfg.batch_size)

    def what():
        prior = "" if class_data is None else f" + {cfg.batch_size} class images"
        size = f"{res}x{res}" if buckets is None else f"aspect buckets of <= {res}x{res} pixels"
        return (f"global batch {cfg.batch_size}{prior} x {k}, {size}, {cfg.step.precision}"
                f"{', remat' if cfg.step.remat else ''}, {mesh.devices.size} device(s)")

    with preflight.oom_as_user_error(what):
        if meta:
            state = resume_state(ck, latest, meta, sd.config, cfg, mesh, run_dir, log)
        else:
            rep = parallel.replicated(mesh)
            state = init_state(parallel.replicate(initial_params(sd, cfg.step, seed), mesh), cfg.optim, rep)
        run_meta = {"seed": seed, "config": config_dict, "optim": dataclasses.asdict(cfg.optim),
                    "step_config": dataclasses.asdict(cfg.step), "base": base_info(cfg), "run_dir": run_dir,
                    "run": {"batch_size": cfg.batch_size, "resolution": res, "random_flip": cfg.random_flip,
                            "random_crop": cfg.random_crop, "aspect_buckets": cfg.aspect_buckets, "steps": cfg.steps,
                            "shuffle_caption": cfg.shuffle_caption, "keep_tokens": cfg.keep_tokens,
                            "processes": n_proc, "devices": int(mesh.devices.size),
                            "textual_inversion": cfg.textual_inversion, "init_word": cfg.init_word,
                            **{f: getattr(cfg, f) for f in DREAMBOOTH_FIELDS}}}
        positions = (int(meta["data"]["position"]), int(meta["data"].get("class_position", 0))) if meta else (0, 0)
        return _loop(cfg, sd, state, (dataset, class_data, buckets), positions, run_dir, run_meta, ck, mesh, what,
                     log)


def _spec(x):
    return (tuple(x.shape), np.dtype(x.dtype), x.sharding)


def _image_size(batch, factor: int) -> tuple[int, int]:
    """(height, width) of a [K, B, ...] batch's images (pixels, or latents x the autoencoder's `factor` from the
    latent cache): the square crop, or the batch's bucket."""
    if "images" in batch:
        h, w = batch["images"].shape[2:4]
    else:
        h, w = (factor * n for n in batch["moments"].shape[2:4])
    return int(h), int(w)


def _loop(cfg, sd, state, datasets, positions, run_dir, run_meta, ck, mesh, what, log):
    (dataset, class_data, buckets), (position, class_position) = datasets, positions
    sd = sd.replace(params={c: v for c, v in sd.params.items() if c not in cfg.step.trained})  # the state has them
    start = int(np.asarray(state.step.addressable_data(0)))
    n_proc, k, res = jax.process_count(), cfg.step.grad_accum, cfg.resolution
    frozen = frozen_inputs(sd.params, sd.tokenize([""]), mesh, unet=cfg.step.frozen_unet)
    key = parallel.replicate(key_data(cfg.seed), mesh)
    loader_kw = dict(batch_size=cfg.batch_size // n_proc, resolution=res, seed=cfg.seed, position=position,
                     random_flip=cfg.random_flip, center_crop=not cfg.random_crop, shard_index=jax.process_index(),
                     num_shards=n_proc, num_workers=cfg.num_workers)
    class_kw = {**loader_kw, "position": class_position}  # DreamBooth's class images: their own order position
    loader_kw.update(shuffle_caption=cfg.shuffle_caption, keep_tokens=cfg.keep_tokens)  # the instance images only
    if buckets is not None:
        loader_kw.update(buckets=buckets, group=k)
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + cfg.stop_after)
    step_fn = jitted_train_step(sd.config, cfg.optim, cfg.step, mesh)
    checked = []  # the batch specs whose compiled step passed the memory check

    def check_compiled(batch):  # compile (and check the memory of) the step for each new batch shape
        spec = jax.tree_util.tree_map(_spec, batch)
        if spec not in checked:
            h, w = _image_size(batch, sd.config.vae.downsample_factor)
            shape = "" if buckets is None else f" for the bucket {w}x{h}"
            log(f"compiling the train step{shape} ({what()}) ...")
            preflight.check_fits(step_fn.lower(state, batch, key, frozen).compile(), what())
            checked.append(spec)

    if cfg.precompute_latents and start < end and buckets is None:  # before the cache is built: that can take long
        rows = cfg.batch_size * (1 if class_data is None else 2)
        check_compiled(abstract_cached_batch(sd, cfg.step, rows, res, mesh, weights=class_data is not None))
    if cfg.precompute_latents:
        from ldm_jax.train import latent_cache

        def cached(data, name, kw):
            cache = latent_cache.build(sd, data, res, cfg.random_flip, os.path.join(run_dir, name), cfg.step.dtype,
                                       log=log, text=not cfg.step.encodes_text, buckets=kw.get("buckets"))
            return latent_cache.cached_batches(cache, data, **kw)

        loader = cached(dataset, "latent_cache", loader_kw)
        class_loader = None if class_data is None else cached(class_data, "latent_cache_class", class_kw)
    else:
        loader = D.batches(dataset, **loader_kw)
        class_loader = None if class_data is None else D.batches(class_data, **class_kw)
    sampler_sd = sd.replace(params={}, dtype=cfg.step.dtype)
    metrics = Metrics(run_dir, jax.process_index() == 0)
    metrics.keep_until(start)  # a crash may have left rows past the checkpoint we resume from

    def checkpoint(step, data):
        kept = {name: data[name] for name in ("position", "epoch", "class_position") if name in data}
        ck.save(step, state.as_dict(), {**run_meta, "data": kept})

    def next_batch():
        rows = [next(loader) for _ in range(k)]
        if class_loader is not None:  # B instance rows, then B class rows (dreambooth.py)
            rows = [dreambooth.combine(r, next(class_loader)) for r in rows]
        if "images" in rows[0]:
            local = {"images": np.stack([r["images"] for r in rows]),
                     "ids": np.stack([sd.tokenize(r["captions"]) for r in rows])}
        elif cfg.step.encodes_text:
            local = {"moments": np.stack([r["moments"] for r in rows]),
                     "ids": np.stack([sd.tokenize(r["captions"]) for r in rows])}
        else:
            names = [name for name in ("moments", "ctx", "pooled") if name in rows[0]]
            local = {name: np.stack([r[name] for r in rows]) for name in names}
        if sd.config.is_sdxl:  # the target size is the crop's: the square, or the bucket
            target = _image_size(local, sd.config.vae.downsample_factor)
            local["sizes"] = np.stack([size_conditioning(r, target) for r in rows])
        st = loader.stats  # the data consumed up to and including this step (the resume position)
        data = {"position": st.position, "epoch": st.epoch, "skipped": st.skipped, "upscaled": st.upscaled}
        if class_loader is not None:
            local["weights"] = np.stack([dreambooth.loss_weights(cfg.batch_size // n_proc, cfg.prior_loss_weight)] * k)
            data["class_position"] = class_loader.stats.position
        return shard_batch(local, mesh), data

    images_per_step = cfg.batch_size * k * (1 if class_loader is None else 2)  # rows through the U-Net
    # `state` is at step `last`, after the data up to `last_data`; `saved`: the newest checkpoint's step (or start);
    # `unflushed`: (step, metrics, data) of the steps whose metrics.jsonl row is not written yet.
    last, last_data, saved, unflushed = start, None, start, []
    loss, bar, t_prev = None, None, time.perf_counter()  # loss: None when this invocation trains no step

    def flush():  # the oldest unwritten metrics row (read one step late, so the device never waits for us)
        nonlocal t_prev, loss
        step, m, data = unflushed[0]
        row = {"step": step, **{n: float(np.asarray(v.addressable_data(0))) for n, v in m.items()}}
        now = time.perf_counter()
        row.update(seconds=now - t_prev, images_per_s=images_per_step / max(now - t_prev, 1e-9), **data)
        t_prev, loss = now, row["loss"]
        metrics.write(row)
        del unflushed[0]
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{row['images_per_s']:.2f}", refresh=False)
            bar.update(1)

    guard = InterruptGuard()
    try:
        with loader, class_loader or contextlib.nullcontext(), guard:
            if samples_missing(cfg, start, run_dir):  # resumed from a run stopped while it drew them
                log(f"drawing the samples of step {start} (not in {os.path.join(run_dir, 'samples')})")
                save_samples(sampler_sd, frozen, state, cfg, res, start, run_dir, mesh)
            if start < end:
                batch, data = next_batch()
                check_compiled(batch)
                parallel.wait_for_all_processes("train step compiled")  # before its first collective
            else:
                log(f"the run is already at step {start} of --steps {cfg.steps}: nothing to train")
            for step in range(start + 1, end + 1):
                if buckets is not None:  # a bucket's first batch: its step compiles (every host the same bucket)
                    check_compiled(batch)
                with guard.critical():  # a Ctrl-C waits until state, step, data position and metrics agree
                    if bar is None:  # the first row's time is its step's, from dispatch (with the first call's
                        t_prev = time.perf_counter()  # set-up), not the few ms until the second step is queued
                    state, m = step_fn(state, batch, key, frozen)
                    last, last_data = step, data
                    unflushed.append((step, m, data))
                    if bar is None:  # the progress (and its rate) starts after the first step
                        jax.block_until_ready(m)
                        bar = progress_bar(cfg.steps, start, cfg.progress and jax.process_index() == 0)
                    while len(unflushed) > 1:
                        flush()
                    if step % cfg.save_every == 0 or step == end:
                        checkpoint(step, data)
                        saved = step
                if cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.steps):
                    save_samples(sampler_sd, frozen, state, cfg, res, step, run_dir, mesh)
                if step < end:
                    batch, data = next_batch()
            with guard.critical():
                while unflushed:
                    flush()
    except jax.errors.JaxRuntimeError as e:  # multi-host: a peer died (gloo/NCCL report a closed connection)
        if n_proc == 1 or "RESOURCE_EXHAUSTED" in str(e):
            raise
        raise UserError(f"lost contact with another process after step {last} ({str(e).splitlines()[0][:160]}); "
                        f"the last checkpoint is step {saved}: start every process again with --resume") from None
    except KeyboardInterrupt:
        while unflushed:
            flush()
        if saved != last:
            log(f"interrupted: saving a checkpoint at step {last} ...")
            try:
                checkpoint(last, last_data)
                ck.wait()
            except Exception as e:  # noqa: BLE001 - e.g. disk full; the earlier checkpoints stay
                log(f"could not save step {last} ({type(e).__name__}); the last checkpoint is {ck.latest_step()}")
        raise
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
    ck.wait()
    model_dir = None
    if last >= cfg.steps and cfg.export != "none":
        model_dir = export_path(run_dir, cfg.step)
        if n_proc == 1:
            export_model(model_dir, sd, state, cfg.step, ema=cfg.export == "ema",
                         meta={"run_dir": run_dir, "step": last, "word": cfg.textual_inversion}, resolution=res)
            log(f"wrote the trained {result_kind(cfg.step)} ({cfg.export} weights) to {model_dir}")
        else:
            model_dir = None
            log(f"multi-host run: export with `ldm-jax train --export-only --out {run_dir} ...` on one host")
    return {"step": last, "loss": loss, "run_dir": run_dir, "model_dir": model_dir}
