"""Device-count and host-count invariance: the same seed gives the same images on 1, 2 or 8 (simulated CPU)
devices, with n not divisible by the device count (padded, extras dropped), and on 2 processes on localhost
(`jax.distributed`), each sampling its share."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from convert.safetensors_io import write_safetensors
from ldm_jax import configs
from ldm_jax.cli.cmd_random import random_params
from ldm_jax.loading import CONFIG_METADATA_KEY
from tests.parity import rel_err

N = 5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from convert.mapping import params_to_state_dict

    cfg = configs.tiny()
    path = tmp_path_factory.mktemp("par") / "tiny.safetensors"
    write_safetensors(path, params_to_state_dict(random_params(cfg, 11)), {CONFIG_METADATA_KEY: cfg.to_json()})
    return str(path)


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(ckpt, out, devices, **extra):
    return subprocess.Popen([sys.executable, "-m", "tests.parallel_worker", ckpt, str(N), str(out)], cwd=ROOT,
                            env=_env(devices, **extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc):
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


@pytest.fixture(scope="module")
def single(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "one.npz"
    _wait(_run(ckpt, out, 1))
    return np.load(out)


@pytest.mark.parametrize("devices", [2, 8])
def test_device_count_invariance(ckpt, single, tmp_path, devices):
    out = tmp_path / "many.npz"
    _wait(_run(ckpt, out, devices))
    many = np.load(out)
    assert int(many["devices"]) == devices and many["images"].shape == single["images"].shape == (N, 16, 16, 3)
    assert rel_err(many["latents"], single["latents"]) <= 1e-5  # float rounding of other per-device batch sizes
    assert np.abs(many["images"].astype(int) - single["images"]).max() <= 1


def test_two_processes_on_localhost(ckpt, single, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_run(ckpt, tmp_path / f"p{i}.npz", 2, LDM_JAX_COORDINATOR=f"127.0.0.1:{port}",
                  LDM_JAX_NUM_PROCESSES=2, LDM_JAX_PROCESS_ID=i) for i in range(2)]
    for p in procs:
        _wait(p)
    parts = [np.load(tmp_path / f"p{i}.npz") for i in range(2)]
    assert all(int(p["processes"]) == 2 and int(p["devices"]) == 4 for p in parts)
    idx = np.concatenate([p["indices"] for p in parts])
    assert sorted(idx.tolist()) == list(range(N))  # each image made by exactly one host
    images = np.concatenate([p["images"] for p in parts])[np.argsort(idx)]
    latents = np.concatenate([p["latents"] for p in parts])[np.argsort(idx)]
    assert rel_err(latents, single["latents"]) <= 1e-5
    assert np.abs(images.astype(int) - single["images"]).max() <= 1


@pytest.mark.parametrize("args,env,message", [
    ((None, 0, None), {}, "the number of processes must be >= 1, got 0"),
    (("localhost:1", 2, 5), {}, r"the process id must be in \[0, 2\), got 5"),
    ((None, None, None), {"LDM_JAX_NUM_PROCESSES": "abc"}, "LDM_JAX_NUM_PROCESSES must be an integer"),
    ((None, None, None), {"LDM_JAX_PROCESS_ID": "-"}, "LDM_JAX_PROCESS_ID must be an integer"),
    (("nonsense", 1, 0), {}, "the coordinator address must be HOST:PORT"),  # an IndexError inside JAX before
    (("127.0.0.1:notaport", 2, 0), {}, "the coordinator address must be HOST:PORT"),  # a segfault before
    (("127.0.0.1:0", 2, 0), {}, "PORT in 1..65535"),
])
def test_bad_multi_host_settings_are_user_errors(monkeypatch, args, env, message):
    from ldm_jax import parallel
    from ldm_jax.errors import UserError

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError, match=message):
        parallel.init_distributed(*args)


def test_incomplete_multi_host_flags_are_one_line_errors(tmp_path):
    """What jax.distributed cannot start from (no coordinator for 2 processes) is one line, exit 2."""
    p = subprocess.run([sys.executable, "-m", "ldm_jax", "txt2img", "--prompt", "x", "--steps", "2", "--out",
                        str(tmp_path / "out"), "--num-processes", "2"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "cannot join the multi-host run" in p.stderr
    assert not (tmp_path / "out").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_hosts(ckpt, out, per_host_flags):
    """`ldm-jax txt2img` on len(per_host_flags) processes of one localhost run (1 device each)."""
    port, n = _free_port(), len(per_host_flags)
    return [subprocess.Popen([sys.executable, "-m", "ldm_jax", "txt2img", "--checkpoint", ckpt, "--prompt", "a shape",
                              "--n", "3", "--steps", "2", "--height", "16", "--width", "16", "--out", str(out),
                              "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i),
                              *flags], cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for i, flags in enumerate(per_host_flags)]


def test_cli_hosts_save_their_share_and_refuse_different_settings(ckpt, tmp_path):
    """Two CLI processes: each saves its images under one run number that process 0 hands out through the
    coordination service (no device collective: that gave up after 30 s when a host was late); hosts started
    with different settings all stop with one line before loading, instead of saving a mix of two requests."""
    out = tmp_path / "out"
    for p in _cli_hosts(ckpt, out, [[], []]):
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-2000:]
    assert sorted(os.listdir(out)) == [f"0-000{i}-a_shape.png" for i in range(3)]  # no grid: no host has all images
    procs = _cli_hosts(ckpt, out, [[], ["--seed", "7"]])
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 2 and "Traceback" not in stderr, stderr[-2000:]
        assert "process(es) 1 were started with other settings than process 0" in stderr
    assert len(os.listdir(out)) == 3
