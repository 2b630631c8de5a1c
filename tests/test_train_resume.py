"""Training state that survives processes: exact resume (4 steps == 2 + resume + 2, bitwise), a process killed
in the middle of a checkpoint save, and the same parameters on 1 device, on 8 simulated devices in 2 processes
(localhost `jax.distributed`, gloo collectives on CPU) with the same global batch, and with gradient accumulation."""

import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from ldm_jax.cli.main import main
from tests.parity import rel_err
from tests.train_worker import COMMON, make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("resume") / "squares")


def _train(data, out, *extra) -> None:
    assert main(["train", *COMMON, "--data", data, "--out", str(out), *extra]) == 0


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """4 steps in one go, a checkpoint after every step."""
    run = tmp_path_factory.mktemp("resume") / "straight"
    _train(data, run, "--steps", "4", "--save-every", "1", "--keep", "10")
    return run


def _state(run, step):
    """(state tree as numpy, meta) of checkpoint `step`, restored onto this process's device."""
    from ldm_jax import configs, parallel
    from ldm_jax.train.checkpoint import Checkpoints
    from ldm_jax.train.resume import state_shapes
    from ldm_jax.train.state import OptimConfig
    from ldm_jax.train.step import StepConfig

    with Checkpoints(os.path.join(run, "checkpoints")) as ck:
        meta = ck.read_meta(step)
        target = state_shapes(configs.tiny(), OptimConfig(**meta["optim"]), StepConfig(**meta["step_config"]),
                              parallel.data_mesh())
        tree, meta = ck.restore(target, step)
    return jax.tree_util.tree_map(np.asarray, tree), meta


def _bitwise_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb))


def test_exact_resume(straight, data, tmp_path):
    run = tmp_path / "split"
    _train(data, run, "--steps", "4", "--save-every", "1", "--keep", "10", "--stop-after", "2")
    first, meta2 = _state(run, 2)
    assert meta2["step"] == 2 and meta2["data"]["position"] == 16
    _train(data, run, "--steps", "4", "--save-every", "1", "--keep", "10", "--resume")
    for step in (2, 4):
        ours, meta = _state(run, step)
        ref, ref_meta = _state(straight, step)
        assert _bitwise_equal(ours, ref), step  # params, EMA, optimiser state, step
        assert meta["data"] == ref_meta["data"] and meta["seed"] == ref_meta["seed"]
    assert not _bitwise_equal(_state(straight, 2)[0]["params"], _state(straight, 4)[0]["params"])


def _rows(run):
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def test_ctrl_c_saves_a_consistent_checkpoint(straight, data, tmp_path, monkeypatch):
    """SIGINT at the awkward instant: in step 2, after the step returned its new state, while step 1's metrics row
    is written (before, the checkpoint was labelled step 1 with step 1's data position but held the state of step 2,
    and row 2 was never written). Now the Ctrl-C waits for the step's bookkeeping: checkpoint 2 holds step 2's state
    and data position, rows 1-2 are written, and resuming equals the uninterrupted run bit for bit, row for row."""
    from ldm_jax.train import progress

    write = progress.Metrics.write

    def write_then_ctrl_c(self, row):
        write(self, row)
        if row["step"] == 1:
            os.kill(os.getpid(), signal.SIGINT)

    run = tmp_path / "interrupted"
    args = ["--steps", "4", "--save-every", "10", "--keep", "10"]
    monkeypatch.setattr(progress.Metrics, "write", write_then_ctrl_c)
    assert main(["train", *COMMON, "--data", data, "--out", str(run), *args]) == 130
    monkeypatch.undo()
    state, meta = _state(run, 2)
    ref, ref_meta = _state(straight, 2)
    assert int(state["step"]) == 2 and meta["data"] == ref_meta["data"]
    assert _bitwise_equal(state, ref)
    assert [r["step"] for r in _rows(run)] == [1, 2]
    _train(data, run, *args, "--resume")
    assert _bitwise_equal(_state(run, 4)[0], _state(straight, 4)[0])
    ours, theirs = _rows(run), _rows(straight)
    assert [r["step"] for r in ours] == [1, 2, 3, 4]
    assert [(r["loss"], r["position"]) for r in ours] == [(r["loss"], r["position"]) for r in theirs]


def test_ctrl_c_while_drawing_samples_redraws_them_on_resume(data, tmp_path, monkeypatch):
    """A Ctrl-C while the samples of step 2 are drawn (checkpoint 2 already saved) left that step without samples
    for good: the resumed run started at step 3. It now draws them first, from checkpoint 2's EMA weights, and they
    equal the ones an uninterrupted run draws."""
    from ldm_jax.train import loop

    args = ["--steps", "3", "--save-every", "2", "--sample-every", "2", "--sample-prompt", "a red square",
            "--sample-prompt", "a blue circle", "--sample-steps", "2"]
    ref = tmp_path / "straight"
    _train(data, ref, *args)
    save = loop.save_samples

    def ctrl_c_then_save(*a, **kw):
        os.kill(os.getpid(), signal.SIGINT)
        save(*a, **kw)

    run = tmp_path / "interrupted"
    monkeypatch.setattr(loop, "save_samples", ctrl_c_then_save)
    assert main(["train", *COMMON, "--data", data, "--out", str(run), *args]) == 130
    monkeypatch.undo()
    assert not os.path.exists(run / "samples" / "step0000002-00.png")
    _train(data, run, *args, "--resume")
    names = sorted(os.listdir(run / "samples"))
    assert names == sorted(os.listdir(ref / "samples")) == [f"step000000{s}-0{i}.png" for s in (2, 3) for i in (0, 1)]
    from PIL import Image

    pixels = lambda path: np.asarray(Image.open(path))  # noqa: E731
    for name in names:
        assert np.array_equal(pixels(run / "samples" / name), pixels(ref / "samples" / name)), name


def _env(devices: int, fast_compile: bool = False, **extra) -> dict:
    # fast_compile: LLVM -O0 for programs compared to float rounding only (compiles ~30% faster on 2 CPU cores)
    flags = f"--xla_force_host_platform_device_count={devices}"
    flags += " --xla_backend_optimization_level=0" if fast_compile else ""
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _worker(args, devices=1, fast_compile=False, **env):
    return subprocess.Popen([sys.executable, "-m", "tests.train_worker", *COMMON, *args], cwd=ROOT,
                            env=_env(devices, fast_compile, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait(proc):
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def test_killed_while_saving(straight, data, tmp_path):
    """SIGKILL while checkpoint 2 is being finalised (all files written to its temporary directory, not yet
    renamed): checkpoint 1 stays the latest, loads, and resuming reproduces the uninterrupted run bit for bit."""
    from ldm_jax.train.checkpoint import Checkpoints

    run = tmp_path / "killed"
    proc = _worker(["--data", data, "--out", str(run), "--steps", "3", "--save-every", "1"],
                   LDM_JAX_TEST_HANG_FINALIZE=2)
    lines = []
    for line in proc.stdout:  # wait for the hook's marker
        lines.append(line)
        if line.startswith("FINALIZING 2 "):
            break
    else:
        pytest.fail("the worker ended before saving step 2:\n" + "".join(lines))
    partial = line.split()[2]
    assert os.path.isdir(partial) and os.listdir(partial)  # a real, half-committed save
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    assert os.path.isdir(partial)  # the kill left the temporary directory behind ...
    with Checkpoints(run / "checkpoints") as ck:
        assert ck.all_steps() == [1]  # ... which is never taken for a checkpoint
        assert not os.path.exists(partial)  # and is removed when the directory is opened again
    state1, _ = _state(run, 1)
    assert _bitwise_equal(state1, _state(straight, 1)[0])
    _train(data, run, "--steps", "3", "--save-every", "1", "--resume")
    assert _bitwise_equal(_state(run, 3)[0], _state(straight, 3)[0])
    assert [r["step"] for r in _rows(run)] == [1, 2, 3]  # rows the killed run wrote past step 1 are not kept twice


@pytest.fixture(scope="module", autouse=True)
def parallel_run(data, tmp_path_factory):
    """3 steps, global batch 8, on 8 simulated devices in 2 processes (4 devices and 4 rows each; the gradient
    mean is a cross-process all-reduce, over gloo on CPU). Started first, in the background, so that its
    compilation overlaps the in-process tests; `test_same_params_on_8_devices_in_2_processes` waits for it.
    (One run covers both invariances: 8 devices instead of 1, 2 processes instead of 1; it costs two compilations
    of the step on the 2 CPU cores the whole suite has, a separate 8-device single-process run a third.)"""
    root = tmp_path_factory.mktemp("parallel")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--data", data, "--steps", "3", "--save-every", "3"]
    procs = [_worker([*args, "--out", str(root / "hosts2")], devices=4, fast_compile=True, LDM_JAX_PROCESS_ID=i,
                     LDM_JAX_COORDINATOR=f"127.0.0.1:{port}", LDM_JAX_NUM_PROCESSES=2) for i in range(2)]
    # the same 8 images per update as 2 accumulated micro-batches of 4, with rematerialised U-Net blocks
    procs.append(_worker([*args, "--out", str(root / "accum"), "--batch-size", "4", "--grad-accum", "2", "--remat"],
                         fast_compile=True))
    yield root, procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


@pytest.mark.parametrize("name, devices, processes", [("hosts2", 8, 2), ("accum", 1, 1)])
def test_same_params_on_8_devices_in_2_processes_and_with_accumulation(straight, parallel_run, name, devices,
                                                                        processes):
    """Against the 1-device run with one batch of 8 per update, to float rounding: the 8-device, 2-process run,
    and the 1-device run accumulating 2 micro-batches of 4 with remat (the same examples, example keys
    fold_in(step_key, k * 4 + row) = the same draws, the mean of the two micro-batch gradients)."""
    root, procs = parallel_run
    for p in procs:
        _wait(p)
    ref, ref_meta = _state(straight, 3)
    ours, meta = _state(root / name, 3)
    assert meta["run"]["devices"] == devices and meta["run"]["processes"] == processes
    assert meta["data"] == ref_meta["data"]
    assert int(ours["step"]) == 3
    for part in ("params", "ema_params", "mu", "nu"):  # Adam's moments each on their own scale
        a, b = _flat(ours, part), _flat(ref, part)
        assert a.size > 0 and rel_err(a, b) <= 1e-5, (part, rel_err(a, b))


def _flat(state: dict, part: str) -> np.ndarray:
    """The leaves of state[part] (params, ema_params) or of the optimiser state's `mu` / `nu`, concatenated."""
    if part in state:
        leaves = jax.tree_util.tree_leaves(state[part])
    else:
        leaves = [x for path, x in jax.tree_util.tree_leaves_with_path(state["opt_state"])
                  if any(getattr(k, "key", getattr(k, "name", None)) == part for k in path)]
    return np.concatenate([np.ravel(x) for x in leaves])


def test_hosts_given_different_training_flags_all_refuse(data, tmp_path):
    """Two processes with different --lr would each apply their own update to the 'replicated' weights and drift
    apart silently: both refuse, one line each, before loading anything; the run directory gets nothing."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_worker(["--data", data, "--out", str(tmp_path / "run"), "--steps", "1", *extra], LDM_JAX_PROCESS_ID=i,
                     LDM_JAX_COORDINATOR=f"127.0.0.1:{port}", LDM_JAX_NUM_PROCESSES=2)
             for i, extra in enumerate([[], ["--lr", "5e-4"]])]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 2 and "Traceback" not in out, out
        assert "process(es) 1 were started with other settings than process 0" in out
    assert not (tmp_path / "run").exists()


def test_hosts_with_their_own_run_directories_refuse(data, tmp_path):
    """Orbax writes each checkpoint from all processes into one RUN_DIR: with a directory per host it waited
    forever at the first save. Now both refuse in one line, and the directory process 0 made is removed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_worker(["--data", data, "--out", str(tmp_path / f"run{i}"), "--steps", "1"], LDM_JAX_PROCESS_ID=i,
                     LDM_JAX_COORDINATOR=f"127.0.0.1:{port}", LDM_JAX_NUM_PROCESSES=2) for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 2 and "Traceback" not in out, out
        assert "do not see the directory process 0 writes" in out
    assert sorted(os.listdir(tmp_path)) == []
