"""Ctrl-C: `ldm-jax txt2img` stopped while its program compiles exits 130 with one line and writes nothing (the
interpreter's teardown after such an interrupt crashed with SIGSEGV; the CLI now leaves without it), and a Ctrl-C that
Python drops (it landed in a gc callback such as JAX's, as one during a compile sometimes did) is delivered again."""

import gc
import os
import signal
import subprocess
import sys
import time

import pytest

from ldm_jax.cli.interrupts import redeliver_dropped_interrupts


def _sigint_inside_next_gc_callback():
    """A gc callback that raises SIGINT once, so its KeyboardInterrupt is raised (and dropped) inside the callback."""
    def callback(phase, info):
        if phase == "start" and callback in gc.callbacks:
            gc.callbacks.remove(callback)
            signal.raise_signal(signal.SIGINT)
    gc.callbacks.append(callback)
    return callback


def _sleep_a_while():
    for _ in range(40):
        time.sleep(0.025)


def test_interrupt_dropped_in_gc_callback_is_lost_without_the_hook():  # what the hook is for
    callback = _sigint_inside_next_gc_callback()
    unraisable = []
    previous, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        gc.collect()
        _sleep_a_while()
    finally:
        sys.unraisablehook = previous
        if callback in gc.callbacks:
            gc.callbacks.remove(callback)
    assert [type(u.exc_value) for u in unraisable] == [KeyboardInterrupt]


def test_interrupt_dropped_in_gc_callback_is_delivered_again():
    _sigint_inside_next_gc_callback()
    with pytest.raises(KeyboardInterrupt):
        with redeliver_dropped_interrupts():
            gc.collect()
            _sleep_a_while()


def test_interrupt_dropped_at_the_end_of_the_block_is_raised_as_it_ends():
    _sigint_inside_next_gc_callback()
    with pytest.raises(KeyboardInterrupt):
        with redeliver_dropped_interrupts():
            gc.collect()  # the block ends before the redelivery


def test_other_unraisable_errors_go_to_the_previous_hook():
    seen = []
    previous, sys.unraisablehook = sys.unraisablehook, seen.append
    try:
        with redeliver_dropped_interrupts():
            class Finalized:
                def __del__(self):
                    raise ValueError("in __del__")
            Finalized()
        _sleep_a_while()
    finally:
        sys.unraisablehook = previous
    assert [type(u.exc_value) for u in seen] == [ValueError]


def test_ctrl_c_while_compiling_is_one_line_and_exit_130(tmp_path):
    env = {**os.environ, "LDM_JAX_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "ldm_jax", "txt2img", "--prompt", "a red circle", "--steps", "23",
                          "--sampler", "ddpm", "--out", str(out)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    for line in p.stdout:  # the bundled model loads while the program compiles (~16 s here): interrupt XLA's
        if line.startswith("compiling the txt2img program"):  # compile, after ~3 s of tracing and lowering
            break
    time.sleep(5.0)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "ldm-jax txt2img: interrupted" and "Traceback" not in err, err[-2000:]
    assert not out.exists()
