"""Ctrl-C: `ldm-jax txt2img` stopped while its program compiles exits 130 with one line and writes nothing (the
interpreter's teardown after such an interrupt crashed with SIGSEGV; the CLI now leaves without it)."""

import os
import signal
import subprocess
import sys
import time


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
