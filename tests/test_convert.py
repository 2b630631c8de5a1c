"""`ldm-jax convert` / `ldm-jax export` and `ldm_jax.load(converted_dir)` on the tiny preset.

Checkpoints are made from the torch reference (`random_state_dict`), written as a Lightning .ckpt (torch.save) or a
.safetensors file carrying the tiny config. The CLI runs in-process (`main([...])`) except where a real process is
the point (torch not importable). Bad inputs are in test_convert_bad_input.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import ldm_jax
from convert.errors import CheckpointError
from convert.keys import PREFIXES
from convert.orbax_io import _stored_tree, is_converted_dir, read_converted
from convert.safetensors_io import read_safetensors, write_safetensors
from convert.torch_reference import build, random_state_dict
from ldm_jax import configs
from ldm_jax.cli.cmd_convert import compvis_schedule_buffers
from ldm_jax.configs import ModelConfig, UNetConfig
from ldm_jax.loading import CONFIG_METADATA_KEY
from tests.cli_run import cli

REPO = Path(__file__).resolve().parents[1]
TINY = configs.tiny()


# --------------------------------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=None)
def _random_state_dict(config: ModelConfig) -> dict[str, np.ndarray]:
    return random_state_dict(config, seed=0)


def tiny_state_dict(config: ModelConfig = TINY) -> dict[str, np.ndarray]:
    """A fresh dict of the cached random CompVis state dict (the arrays are shared: do not modify them)."""
    return dict(_random_state_dict(config))


def save_safetensors(path, state_dict, config: ModelConfig | None = TINY) -> Path:
    write_safetensors(path, state_dict, {CONFIG_METADATA_KEY: config.to_json()} if config else None)
    return Path(path)


def save_ckpt(path, state_dict, **extras) -> Path:
    sd = {k: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v for k, v in state_dict.items()}
    torch.save({"state_dict": sd, "global_step": 1, "epoch": 0, **extras}, path)
    return Path(path)


def leftovers(out_dir: Path) -> list[str]:
    """Temporary or set-aside siblings of OUT_DIR that a conversion must never leave behind."""
    return sorted(p.name for p in out_dir.parent.iterdir() if p.name.startswith(out_dir.name + ".")
                  and (".tmp-" in p.name or ".old-" in p.name))


def assert_failed(rc: int, err: str, out_dir: Path | None, *needles: str) -> None:
    assert rc != 0
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    if out_dir is not None:
        assert not out_dir.exists()
        assert leftovers(out_dir) == []


def leaves(params) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}


def assert_same_params(a, b) -> None:
    """Same tree, same dtypes, same bits."""
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    for k in la:
        assert la[k].dtype == lb[k].dtype and la[k].shape == lb[k].shape, k
        assert np.array_equal(la[k].view(f"u{la[k].itemsize}"), lb[k].view(f"u{lb[k].itemsize}")), k


def convert(src, out_dir, *args) -> str:
    rc, out, err = cli("convert", src, out_dir, *args)
    assert rc == 0, err
    assert is_converted_dir(out_dir) and leftovers(Path(out_dir)) == []
    return out + err


# --------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_convert_loads_bit_identical_with_metadata(tmp_path, fmt):
    sd = tiny_state_dict()
    if fmt == "ckpt":  # Lightning extras beside the weights are dropped
        src = save_ckpt(tmp_path / "m.ckpt", sd, optimizer_states=[{"state": {}, "param_groups": [{"lr": 1e-4}]}],
                        lr_schedulers=[], **{"pytorch-lightning_version": "1.4.2"})
        args = ["--preset", "tiny"]
    else:
        src, args = save_safetensors(tmp_path / "m.safetensors", sd), []
    out = tmp_path / "out"
    log = convert(src, out, *args)
    assert "mapped 446 tensors" in log
    direct = ldm_jax.load(src, config=TINY)
    loaded = ldm_jax.load(out)
    assert loaded.config == TINY
    assert_same_params(loaded.params, direct.params)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["source"] == src.name and meta["source_size"] == src.stat().st_size
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert (meta["kind"], meta["config_name"], meta["ema"], meta["dtype"]) == ("sd1", "tiny", False, "float32")
    assert meta["ldm_jax_version"] == ldm_jax.__version__ and meta["format"] == "ldm-jax-converted"
    assert meta["report"] == {"mapped": 446, "ignored": {}, "unexpected": []}
    assert loaded.metadata["source_sha256"] == meta["source_sha256"]
    assert ModelConfig.from_json((out / "config.json").read_text()) == TINY
    assert not is_converted_dir(tmp_path) and not is_converted_dir(src)


def _with_ema(sd):
    ema = {}
    for k, v in sd.items():
        if k.startswith(PREFIXES["unet"]):
            ema["model_ema." + k[len("model."):].replace(".", "")] = v + np.float32(0.5)
    return {**sd, **ema, "model_ema.decay": np.array(0.9999, np.float32),
            "model_ema.num_updates": np.array(1234, np.int32)}


def test_ema_default_no_ema_and_mismatch_errors(tmp_path):
    src = save_safetensors(tmp_path / "ema.safetensors", _with_ema(tiny_state_dict()))
    log = convert(src, tmp_path / "ema")
    assert "U-Net from EMA weights" in log
    convert(src, tmp_path / "raw", "--no-ema")
    ema_dir, raw_dir = ldm_jax.load(tmp_path / "ema"), ldm_jax.load(tmp_path / "raw")
    assert_same_params(ema_dir.params, ldm_jax.load(src, ema=True).params)
    assert_same_params(raw_dir.params, ldm_jax.load(src, ema=False).params)
    assert not np.array_equal(leaves(ema_dir.params["unet"])["['out_2']['bias']"],
                              leaves(raw_dir.params["unet"])["['out_2']['bias']"])
    meta = json.loads((tmp_path / "ema" / "metadata.json").read_text())
    assert meta["ema"] is True and meta["ema_available"] is True
    n_unet = sum(k.startswith(PREFIXES["unet"]) for k in tiny_state_dict())
    assert meta["report"]["ignored"] == {"EMA bookkeeping": 2, "raw weights replaced by their EMA copy": n_unet}
    assert ldm_jax.load(tmp_path / "ema", ema=True).metadata["ema"] is True
    with pytest.raises(CheckpointError, match=r"converted with EMA weights \(--ema\).*--no-ema"):
        ldm_jax.load(tmp_path / "ema", ema=False)
    with pytest.raises(CheckpointError, match=r"from the raw weights \(--no-ema\).*--ema"):
        read_converted(tmp_path / "raw", ema=True)
    plain = save_safetensors(tmp_path / "plain.safetensors", tiny_state_dict())
    convert(plain, tmp_path / "plain")
    with pytest.raises(CheckpointError, match="from a checkpoint without EMA weights"):
        ldm_jax.load(tmp_path / "plain", ema=True)
    rc, _, err = cli("convert", plain, tmp_path / "x", "--ema")
    assert_failed(rc, err, tmp_path / "x", "no model_ema.* weights")


def test_missing_ema_tensor_is_named(tmp_path):
    sd = _with_ema(tiny_state_dict())
    del sd["model_ema.diffusion_modelout2bias"]
    src = save_safetensors(tmp_path / "ema.safetensors", sd)
    rc, _, err = cli("convert", src, tmp_path / "out")
    assert_failed(rc, err, tmp_path / "out", "model_ema.diffusion_modelout2bias",
                  "EMA copy of model.diffusion_model.out.2.bias")


def test_dtype_is_stored_and_loads_upcast(tmp_path):
    src = save_safetensors(tmp_path / "m.safetensors", tiny_state_dict())
    fp32 = leaves(ldm_jax.load(src).params)
    for dtype, name in (("bf16", "bfloat16"), ("fp16", "float16")):
        out = tmp_path / dtype
        convert(src, out, "--dtype", dtype)
        stored = jax.tree_util.tree_leaves(_stored_tree(str(out / "params")), is_leaf=lambda x: hasattr(x, "dtype"))
        assert {np.dtype(m.dtype).name for m in stored} == {name}
        assert json.loads((out / "metadata.json").read_text())["dtype"] == name
        upcast = leaves(ldm_jax.load(out).params)
        assert upcast.keys() == fp32.keys()
        for k, v in upcast.items():
            assert v.dtype == np.float32 and np.array_equal(v, fp32[k].astype(name).astype(np.float32)), k
        native = leaves(ldm_jax.load(out, param_dtype=name).params)
        assert all(v.dtype == np.dtype(name) for v in native.values())


def test_export_round_trip_is_bit_exact_and_loads_in_torch(tmp_path):
    from safetensors.torch import load_file

    sd = tiny_state_dict()
    src = save_ckpt(tmp_path / "m.ckpt", sd)
    convert(src, tmp_path / "conv", "--preset", "tiny")
    rc, out, err = cli("export", tmp_path / "conv", tmp_path / "back.safetensors")
    assert rc == 0, err and "446 tensors" in out
    back, meta = read_safetensors(tmp_path / "back.safetensors")
    assert back.keys() == sd.keys()
    for k in sd:
        assert back[k].dtype == np.float32 and np.array_equal(back[k].view(np.uint32), sd[k].view(np.uint32)), k
    assert meta["format"] == "pt" and ModelConfig.from_json(meta[CONFIG_METADATA_KEY]) == TINY
    assert meta["ldm_jax.source"] == "m.ckpt" and meta["ldm_jax.ema"] == "false"
    assert_same_params(ldm_jax.load(tmp_path / "back.safetensors").params, ldm_jax.load(tmp_path / "conv").params)
    torch_sd = load_file(tmp_path / "back.safetensors")  # read by safetensors' torch loader
    modules = build(TINY, {k: v.numpy() for k, v in torch_sd.items()})  # strict load into labml / transformers
    assert set(modules) == {"unet", "vae", "text_encoder"}
    assert torch.equal(modules["unet"].out[2].bias, torch.from_numpy(sd["model.diffusion_model.out.2.bias"]))
    rc, _, err = cli("export", tmp_path / "conv", tmp_path / "half.safetensors", "--dtype", "fp16")
    assert rc == 0, err
    half, _ = read_safetensors(tmp_path / "half.safetensors")
    assert all(half[k].dtype == np.float16 and np.array_equal(half[k], sd[k].astype(np.float16)) for k in sd)


def test_old_clip_layout_float_position_ids_nested_state_dict(tmp_path):
    sd = tiny_state_dict()
    new, old = "cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."
    legacy = {(old + k[len(new):] if k.startswith(new) else k): v for k, v in sd.items()}
    legacy[old + "embeddings.position_ids"] = np.arange(77, dtype=np.float32)[None]
    src = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"state_dict": {k: torch.from_numpy(v) for k, v in legacy.items()}}}, src)
    convert(src, tmp_path / "out", "--preset", "tiny")
    assert_same_params(ldm_jax.load(tmp_path / "out").params,
                       ldm_jax.load(save_safetensors(tmp_path / "new.safetensors", sd)).params)
    report = json.loads((tmp_path / "out" / "metadata.json").read_text())["report"]
    assert report["ignored"] == {"position ids (arange)": 1}


def test_schedule_buffers_compared_with_recomputed_schedule(tmp_path):
    buffers = compvis_schedule_buffers(TINY.schedule)
    good = save_safetensors(tmp_path / "good.safetensors",
                            {**tiny_state_dict(), **{k: v.astype(np.float32) for k, v in buffers.items()}})
    rc, out, err = cli("convert", good, tmp_path / "good")
    assert rc == 0 and err == "", err
    assert "ignored 12: noise schedule buffer" in out
    half = save_safetensors(tmp_path / "half.safetensors",
                            {**tiny_state_dict(), **{k: v.astype(np.float16) for k, v in buffers.items()}})
    rc, _, err = cli("convert", half, tmp_path / "half")
    assert rc == 0 and err == "", err
    bad = {**buffers, "betas": buffers["betas"] * 1.01}
    src = save_safetensors(tmp_path / "bad.safetensors",
                           {**tiny_state_dict(), **{k: v.astype(np.float32) for k, v in bad.items()}})
    rc, _, err = cli("convert", src, tmp_path / "bad")
    assert rc == 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "warning" in lines[0] and "'betas'" in lines[0], err
    assert is_converted_dir(tmp_path / "bad")


def test_inpainting_kind(tmp_path):
    config = ModelConfig(name="tiny-inpaint", unet=UNetConfig(**{**TINY.unet.__dict__, "in_channels": 9}),
                         vae=TINY.vae, text=TINY.text)
    src = save_safetensors(tmp_path / "inp.safetensors", tiny_state_dict(config), config)
    convert(src, tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["kind"] == "sd1-inpaint" and ldm_jax.load(tmp_path / "out").config.is_inpainting


def test_overwrite_and_atomic_replace(tmp_path, monkeypatch):
    src = save_safetensors(tmp_path / "m.safetensors", tiny_state_dict())
    out = tmp_path / "out"
    out.mkdir()
    convert(src, out)  # an empty directory is fine
    (out / "keep.txt").write_text("x")
    rc, _, err = cli("convert", src, out)
    assert rc != 0 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (out / "keep.txt").exists()

    import orbax.checkpoint as ocp

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ocp.Checkpointer, "save", interrupted)
    rc, _, err = cli("convert", src, out, "--overwrite")
    assert rc == 130 and (out / "keep.txt").exists() and leftovers(out) == []
    rc, _, err = cli("convert", src, tmp_path / "new")
    assert_failed(rc, err, tmp_path / "new", "interrupted")
    monkeypatch.undo()
    convert(src, out, "--overwrite")
    assert not (out / "keep.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors", "out"]


def test_convert_and_load_without_torch(tmp_path):
    sd = tiny_state_dict()
    save_ckpt(tmp_path / "m.ckpt", sd)
    code = f"""
        import sys
        sys.modules["torch"] = None  # `import torch` now fails
        import numpy as np, jax, ldm_jax
        from ldm_jax.cli.main import main
        d = {str(tmp_path)!r}
        assert main(["convert", d + "/m.ckpt", d + "/a", "--preset", "tiny"]) == 0
        assert main(["export", d + "/a", d + "/e.safetensors"]) == 0
        a = ldm_jax.load(d + "/a")
        src = ldm_jax.load(d + "/m.ckpt", config=a.config)
        for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(src.params)):
            assert np.array_equal(x, y)
        try:
            import torch
        except ImportError:
            print("torch-free OK")
    """
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "torch-free OK" in r.stdout


def test_ctrl_c_during_the_orbax_save_waits_for_its_writers_then_cleans_up(tmp_path, monkeypatch):
    """Orbax writes on background threads; a Ctrl-C that stopped the wait for them used to remove the temporary
    directory while they still wrote into it (re-creating it, with NOT_FOUND tracebacks on stderr)."""
    import _thread
    import threading
    import time

    import orbax.checkpoint as ocp

    writers = []

    def save(self, directory, *args, **kwargs):  # orbax-like: writer threads, and a wait the interrupt lands in
        def write():
            for i in range(8):
                os.makedirs(directory, exist_ok=True)
                (Path(directory) / f"chunk{i}").write_bytes(b"x")
                if i == 0:
                    _thread.interrupt_main()  # Ctrl-C while the writer is busy
                time.sleep(0.03)

        writers.append(threading.Thread(target=write))
        writers[-1].start()
        while writers[-1].is_alive():
            time.sleep(0.005)

    monkeypatch.setattr(ocp.Checkpointer, "save", save)
    src = save_safetensors(tmp_path / "m.safetensors", tiny_state_dict())
    rc, _, err = cli("convert", src, tmp_path / "out")
    for w in writers:
        w.join()
    assert rc == 130 and err == "ldm-jax convert: interrupted\n"
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_ctrl_c_of_a_real_convert_leaves_nothing_and_one_line(tmp_path):
    """SIGINT to a real `ldm-jax convert` shortly after orbax started writing: exit 130, one line on stderr, no
    temporary directory left; or, if it had already finished, a complete OUT_DIR (exit 0, or killed by the signal
    while the interpreter shut down)."""
    import glob
    import signal
    import time

    src = save_safetensors(tmp_path / "m.safetensors", tiny_state_dict())
    for delay in (0.05, 0.15):
        p = subprocess.Popen([sys.executable, "-m", "ldm_jax", "convert", str(src), str(tmp_path / "out")], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not glob.glob(str(tmp_path / "out.tmp-*" / "params*")) and p.poll() is None:
            time.sleep(0.002)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        finished = p.returncode in (0, -signal.SIGINT)
        assert finished or p.returncode == 130, (p.returncode, err[:3000])
        assert len(err.strip().splitlines()) <= 1 and "Traceback" not in err, err[:3000]
        time.sleep(0.2)  # a writer left running would re-create its directory now
        assert leftovers(tmp_path / "out") == []
        assert sorted(os.listdir(tmp_path)) == (["m.safetensors", "out"] if finished else ["m.safetensors"])
        if finished:
            assert is_converted_dir(tmp_path / "out")
            import shutil

            shutil.rmtree(tmp_path / "out")
