"""Load the weights while the sampling program compiles: a new process's first image costs max(load, compile)
instead of their sum.

The txt2img / img2img / inpaint program depends on the parameters' shapes only, and a checkpoint written by
ldm-jax (a converted directory, or a .safetensors with its config in the header) names its architecture before
a single tensor is read. So the program compiles, or comes from JAX's persistent cache, against
`abstract_params(config)` on this thread while another reads the tensors and puts them on the device; the
loaded model then adopts the program (only if config, dtypes and parameter tree match; else it compiles its
own, as without this module). Other checkpoints (CompVis files, whose architecture is inferred from the
tensors) load first, as before.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

from ldm_jax.loading import DEFAULT_MODEL, file_config, load
from ldm_jax.models.build import abstract_params
from ldm_jax.pipelines.generate import Timings, adopt_programs, precompile
from ldm_jax.stable_diffusion import StableDiffusion


def peek_config(path: str | os.PathLike | None):
    """The architecture a checkpoint declares without reading its tensors (None: it declares none)."""
    path = DEFAULT_MODEL if path is None else os.fspath(path)
    if os.path.isdir(path):
        from convert.orbax_io import is_converted_dir, read_info

        return read_info(path)[0] if is_converted_dir(path) else None
    if not os.path.isfile(path):
        return None  # load() says what is wrong with the path
    return file_config(path)


def load_while_compiling(path, mode: str, prompts, *, dtype="float32", attention_impl: str = "auto",
                         load_kwargs: dict | None = None, **request) -> tuple[StableDiffusion, Timings]:
    """`load(path, dtype=..., attention_impl=..., **load_kwargs)` on a worker thread while the program of
    `generate(sd, mode, prompts, **request)` compiles on this one, when the checkpoint declares its config (else
    it just loads). Returns the model, holding that program when it matched, and `compile_while`'s timings."""
    load_kwargs = dict(load_kwargs or {}, dtype=dtype, attention_impl=attention_impl)
    config = None if load_kwargs.get("config") else peek_config(path)
    if config is not None and load_kwargs.get("prediction"):  # load() gives the loaded model this prediction too
        from convert.prediction import with_prediction

        config = with_prediction(config, load_kwargs["prediction"])
    if config is not None and load_kwargs.get("embeddings"):  # and these rows more in each text encoder's table
        from convert.embeddings import check_embeddings, with_embedding_rows

        load_kwargs["embeddings"] = check_embeddings(load_kwargs["embeddings"], config)  # read once, here
        config = with_embedding_rows(config, load_kwargs["embeddings"])
    if config is None:
        t0 = time.perf_counter()
        sd = load(path, **load_kwargs)
        timings = Timings()
        timings.extra.update(load_s=time.perf_counter() - t0, overlapped=False)
        return sd, timings
    return compile_while(lambda: load(path, **load_kwargs), config, mode, prompts, dtype=dtype,
                         attention_impl=attention_impl, **request)


def compile_while(loader, config, mode: str, prompts, *, dtype="float32", attention_impl: str = "auto",
                  warm_up: bool = False, **request) -> tuple[StableDiffusion, Timings]:
    """Run `loader()` (-> StableDiffusion) on a worker thread while this one compiles the program of
    `generate(sd, mode, prompts, **request)` for `config`'s parameter shapes. Returns the loaded model, holding
    that program if it matched, and the timings: compile (seconds spent compiling or reading the cache on this
    thread; 0 if the program did not match), extra["load_s"] (the loader's own time) and extra["overlapped"].
    warm_up: if the weights are still loading once the program is ready, run it once on zero weights made on the
    device (`generate`'s warm_up; extra["warm_up_s"]). For GPUs, where an executable's first run pays one-off
    set-up; off by default until measured there (on a CPU the first run costs what later runs do)."""
    shadow = StableDiffusion(config, abstract_params(config), dtype=dtype, attention_impl=attention_impl)

    def timed_load():
        t = time.perf_counter()
        return loader(), time.perf_counter() - t

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ldm-jax-load")
    try:
        loading = pool.submit(timed_load)
        timings = precompile(shadow, mode, prompts, warm_up=(lambda: not loading.done()) if warm_up else False,
                             **request)
        sd, load_s = loading.result()  # a load error surfaces here, as it would without the overlap
    except KeyboardInterrupt:  # do not wait for the rest of the load (seconds for SD 1.x); the CLI exits at once
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    except BaseException:  # an error: wait for the load, as leaving a `with` block would
        pool.shutdown(wait=True)
        raise
    pool.shutdown(wait=True)
    timings.extra.update(load_s=load_s, overlapped=adopt_programs(sd, shadow))
    if not timings.extra["overlapped"]:
        timings.compile = 0.0
    return sd, timings
