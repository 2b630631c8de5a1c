"""warm_start: the program compiled from parameter shapes while the weights load is the program the loaded model
would compile (same images, nothing compiled again), and it is only handed over to the model it was built for."""

import os
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ldm_jax
from convert.safetensors_io import read_safetensors, write_safetensors
from ldm_jax import parallel
from ldm_jax.cli.main import main
from ldm_jax.configs import tiny
from ldm_jax.models.build import abstract_params
from ldm_jax.pipelines import Timings, generate, txt2img
from ldm_jax.pipelines.generate import adopt_programs, precompile
from ldm_jax.warm_start import compile_while, load_while_compiling, peek_config

PROMPTS = ["a red circle", "a blue square"]
REQUEST = dict(steps=4, height=16, width=24, seed=11, negative_prompts=["blurry", ""])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("warm") / "tiny.safetensors"
    assert main(["random-checkpoint", str(path), "--preset", "tiny", "--seed", "5"]) == 0
    return str(path)


def test_program_compiled_while_loading_gives_the_same_images_and_is_not_compiled_again(ckpt):
    sd, ahead = load_while_compiling(ckpt, "txt2img", PROMPTS, **REQUEST)
    assert ahead.extra["overlapped"] and ahead.compile > 0 and ahead.extra["load_s"] > 0
    tm = Timings()
    got = txt2img(sd, PROMPTS, **REQUEST, timings=tm)
    assert tm.cached  # the adopted program, not a new compile
    want = txt2img(ldm_jax.load(ckpt), PROMPTS, **REQUEST)
    np.testing.assert_array_equal(got, want)


def test_programs_go_only_to_the_model_they_were_built_for(ckpt):

    sd = ldm_jax.load(ckpt)
    for other in (sd.replace(params=abstract_params(sd.config), dtype=jnp.bfloat16),  # another compute dtype
                  sd.replace(params=abstract_params(sd.config), attention_impl="xla")):
        precompile(other, "txt2img", PROMPTS, **REQUEST)
        assert any(k[0] == "program" for k in other.cache)
        assert not adopt_programs(sd, other) and not any(k[0] == "program" for k in sd.cache)
    fp16_params = sd.replace(params=ldm_jax.load(ckpt, param_dtype="float16").params)
    assert not adopt_programs(fp16_params, sd.replace(params=abstract_params(sd.config)))


def test_warm_up_runs_the_program_on_device_zeros_while_the_weights_load(ckpt, monkeypatch):
    """The loader waits until the warm-up has run, so it runs (only while the weights are still loading); the
    loaded model then uses the warmed program, draws what a plain load draws, and shares no buffer with it."""
    warmed = threading.Event()
    real_warm_up = generate._warm_up

    def noting_warm_up(*a, **k):
        real_warm_up(*a, **k)
        warmed.set()

    monkeypatch.setattr(generate, "_warm_up", noting_warm_up)

    def loader():
        assert warmed.wait(timeout=120)
        return ldm_jax.load(ckpt)

    config = peek_config(ckpt)
    sd, ahead = compile_while(loader, config, "txt2img", PROMPTS, warm_up=True, **REQUEST)
    assert ahead.extra["overlapped"] and ahead.extra["warm_up_s"] > 0
    tm = Timings()
    got = txt2img(sd, PROMPTS, **REQUEST, timings=tm)
    assert tm.cached
    np.testing.assert_array_equal(got, txt2img(ldm_jax.load(ckpt), PROMPTS, **REQUEST))
    warmed.clear()  # asked when the program is ready (compile_while: are the weights still loading?): no
    assert "warm_up_s" not in precompile(sd.replace(params=abstract_params(config)), "txt2img", PROMPTS,
                                         warm_up=lambda: False, **REQUEST).extra
    assert not warmed.is_set()


def test_device_zeros_share_one_buffer_per_shape():
    shapes = abstract_params(tiny())
    zeros = parallel.device_zeros(shapes, parallel.replicated())
    leaves, want = jax.tree_util.tree_leaves(zeros), jax.tree_util.tree_leaves(shapes)
    assert [(x.shape, x.dtype) for x in leaves] == [(x.shape, x.dtype) for x in want]
    assert all(not np.asarray(x).any() for x in leaves)
    assert len({id(x) for x in leaves}) == len({(x.shape, x.dtype) for x in want}) < len(leaves)


def test_peek_config_reads_the_declared_architecture_only(ckpt, tmp_path):
    want = ldm_jax.load(ckpt).config
    assert peek_config(ckpt) == want
    assert peek_config(None).name == "shapes"  # the bundled model
    tensors, _ = read_safetensors(ckpt)
    bare = tmp_path / "bare.safetensors"  # no config in the header: the architecture comes from the tensors
    write_safetensors(bare, dict(tensors))
    assert peek_config(str(bare)) is None and peek_config(str(tmp_path / "missing.safetensors")) is None
    sd, ahead = load_while_compiling(str(bare), "txt2img", PROMPTS, load_kwargs={"config": want}, **REQUEST)
    assert not ahead.extra["overlapped"] and sd.config == want
    out = tmp_path / "converted"
    assert main(["convert", ckpt, str(out)]) == 0
    assert peek_config(str(out)) == want and peek_config(str(tmp_path)) is None


_ONE_PROGRAM = """
import os, sys
import ldm_jax
from ldm_jax.models.build import abstract_params
from ldm_jax.pipelines import txt2img
from ldm_jax.pipelines.generate import precompile
sd = ldm_jax.load(sys.argv[1])
if sys.argv[2] == "weights":
    txt2img(sd, "a cat", steps=4, height=32, width=32)
else:
    precompile(sd.replace(params=abstract_params(sd.config)), "txt2img", "a cat", steps=4, height=32, width=32)
"""


def test_program_from_shapes_has_the_persistent_cache_key_of_the_program_from_weights(ckpt, tmp_path):
    """Compiled from shapes, the program must be the same XLA program (same cache entry) as from the weights: a
    new process's warm start then reads what an earlier plain run left in the cache, and vice versa."""
    env = {**os.environ, "LDM_JAX_CACHE_DIR": str(tmp_path)}
    for how in ("weights", "shapes"):
        p = subprocess.run([sys.executable, "-c", _ONE_PROGRAM, ckpt, how], env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-2000:]
        assert len([f for f in os.listdir(tmp_path) if f.startswith("jit_run")]) == 1, how


def test_ctrl_c_during_the_compile_does_not_wait_for_the_load(monkeypatch):
    """Leaving a `with ThreadPoolExecutor` block joined the loader: a Ctrl-C waited for the rest of the load."""
    import time

    from ldm_jax import warm_start

    release = threading.Event()

    def slow_loader():
        release.wait(30)

    def interrupted_compile(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(warm_start, "precompile", interrupted_compile)
    t = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        compile_while(slow_loader, tiny(), "txt2img", ["x"], steps=2)
    assert time.perf_counter() - t < 5
    release.set()
