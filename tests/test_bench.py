"""`ldm-jax bench` on the tiny preset: the rows it prints and writes, the torch ratio, compile-only memory."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ldm_jax.cli.main import main
from ldm_jax import configs
from ldm_jax.configs import preset
from ldm_jax.models.build import abstract_params


def test_bench_unet_vae_and_torch_ratio(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--size", "64", "--images", "1", "--iters", "2", "--torch",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "U-Net step, 1 image(s): ldm-jax / labml torch = " in printed
    assert "VAE decode, 1 image(s): ldm-jax / diffusers torch = " in printed  # diffusers is in the torch extra
    rows = {(r["what"], r["impl"]): r for r in json.loads(out.read_text())}
    assert set(rows) == {(what, impl) for what in ("unet_step_cfg", "vae_decode")
                         for impl in ("ldm-jax", "labml-torch", "diffusers")}
    assert all(r["seconds"] > 0 for r in rows.values())
    assert rows[("unet_step_cfg", "ldm-jax")]["batch"] == 2  # one image with classifier-free guidance
    assert rows[("unet_step_cfg", "ldm-jax")]["extra"]["cudnn_attention"] == 0  # XLA attention on the CPU


def test_bench_torch_sd2_kind_times_diffusers_u_net_only(tmp_path, capsys, monkeypatch):
    """labml has no SD 2.x-style U-Net: `--torch` leaves its U-Net rows out (it used to fail after the ldm-jax
    timings) and times diffusers' SD 2.x U-Net, built from the preset with as many parameters as ours."""
    from convert.torch_bench import diffusers_models
    from tests.test_sd2 import TINY2

    monkeypatch.setitem(configs.PRESETS, "tiny-sd2", lambda: TINY2)
    unet, _ = diffusers_models(TINY2)
    count = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(abstract_params(TINY2)["unet"]))
    assert sum(p.numel() for p in unet.parameters()) == count
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny-sd2", "--size", "64", "--images", "1", "--iters", "1", "--torch",
                 "--json", str(out)]) == 0
    assert "labml has no U-Net of tiny-sd2's kind" in capsys.readouterr().out
    rows = {(r["what"], r["impl"]) for r in json.loads(out.read_text())}
    assert ("unet_step_cfg", "labml-torch") not in rows
    assert {("unet_step_cfg", "diffusers"), ("vae_decode", "labml-torch"), ("vae_decode", "diffusers")} <= rows


def test_bench_memory_is_compile_only_and_grows_with_the_batch(tmp_path):
    out = tmp_path / "mem.json"
    assert main(["bench", "--memory", "--preset", "tiny", "--size", "64", "--images", "1,4", "--steps", "4",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["images"] for r in rows] == [1, 4] and all(r["extra"]["compiled_only"] for r in rows)
    param_mb = sum(np.prod(s.shape) * 4 for s in jax.tree_util.tree_leaves(abstract_params(preset("tiny")))) / 2**20
    one, four = (r["extra"]["program_mb"] for r in rows)
    assert param_mb < one < four  # the fp32 params are arguments of the program; activations grow with the batch


def test_psnr_known_values():
    """The bf16-vs-fp32 report's PSNR (scripts/gpu_ab.py, gpu_checks.py): 10 log10(255^2 / MSE)."""
    from ldm_jax.images import psnr

    a = np.zeros((2, 4, 4, 3), np.uint8)
    assert psnr(a, a) == float("inf")
    assert psnr(a, a + 1) == pytest.approx(20 * np.log10(255.0))  # MSE 1: 48.13 dB
    b = a.copy()
    b[0, 0, 0, 0] = 255  # MSE 255^2 / 96
    assert psnr(a, b) == pytest.approx(10 * np.log10(96.0))


def test_gpu_ab_script_runs_its_variants_on_the_cpu(tmp_path):
    """scripts/gpu_ab.py (run by hand on a GPU) must not rot between device sessions: two variants, tiny preset."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ab.json"
    variants = "baseline,norm_two_pass"
    p = subprocess.run([sys.executable, str(root / "scripts" / "gpu_ab.py"), "--out", str(out), "--preset", "tiny",
                        "--size", "64", "--steps", "2", "--iters", "1", "--variants", variants],
                       capture_output=True, text=True, cwd=root,
                       env={**os.environ, "PYTHONPATH": str(root), "LDM_JAX_NO_PROGRAM_CACHE": "0"})
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    # the baseline worker stored its 1-image program; the new process finds it under the same key
    assert res["first_image_overlap"]["phases_s"]["program_cache"] == "hit"
    assert res["first_image_overlap_no_program_cache"]["phases_s"]["program_cache"] == "off"
    warmed = res["first_image_overlap_warm_up"]  # warm_up_s is None when the zeros were on the device first
    assert warmed["to_image_s"] > 0 and "error" not in warmed and "warm_up" in warmed["phases_s"]
    base, two_pass = res["variants"]["baseline"], res["variants"]["norm_two_pass"]
    assert base["1"]["seconds"] > 0 and base["8"]["cudnn_attention"] == 0 and two_pass["8"]["seconds"] > 0
    assert abs(two_pass["8"]["image_mean"] - base["8"]["image_mean"]) < 1.0  # same images up to rounding
    assert res["first_image_warm_cache_s"] > 0 and res["first_image_serial"]["phases_s"]["program_alone"] > 0
    from_file = res["first_image_checkpoint_overlap"]  # the weights read from the fp16 .safetensors it wrote
    assert from_file["to_image_s"] > 0 and from_file["phases_s"]["weights_alone"] > 0 and "error" not in from_file


def test_gpu_profile_script_runs_on_the_cpu(tmp_path):
    """scripts/gpu_profile.py (run by hand on a GPU): first-image phases from a cold and a warm cache, and a U-Net
    step profile (no device kernels on a CPU, so only its wall time is checked here)."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "profile.json"
    p = subprocess.run([sys.executable, str(root / "scripts" / "gpu_profile.py"), "--out", str(out), "--preset",
                        "tiny", "--size", "64", "--steps", "2", "--images", "1", "--loop-images", "1", "--iters", "1",
                        "--hlo-dir", str(tmp_path)],
                       capture_output=True, text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    cold, warm = res["first_image_cold"]["phases_s"], res["first_image_warm"]["phases_s"]
    assert warm["first_image"] > warm["weights_and_program"] > warm["import"] > 0 and cold["program_alone"] > 0
    assert res["first_image_warm"]["n_xla_compiles"] >= 1 and res["unet_step_1"]["wall_ms_per_step"] > 0
    assert res["txt2img_1"]["end_to_end_s"] > 0 and res["txt2img_1"]["device_events_per_step"] == 0  # no GPU here
    with gzip.open(tmp_path / "unet_step_1.hlo.txt.gz", "rt") as f:  # the optimized HLO, for kernel names
        assert "HloModule" in f.read(1000)


@pytest.mark.parametrize("name", ["tiny", "tiny-xl"])
def test_diffusers_peer_has_the_presets_architecture(name):
    """The diffusers timing peer is built from the preset: same parameter count as ours, U-Net and VAE."""
    from convert.torch_bench import diffusers_models

    cfg = preset(name)
    ours = abstract_params(cfg)
    count = lambda tree: sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(tree))  # noqa: E731
    unet, vae = diffusers_models(cfg)
    assert sum(p.numel() for p in unet.parameters()) == count(ours["unet"])
    assert sum(p.numel() for p in vae.parameters()) == count(ours["vae"])


def test_gpu_transfer_script_runs_on_the_cpu(tmp_path):
    """scripts/gpu_transfer.py (run by hand on a GPU): the three ways of placing the weights, tiny preset."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "transfer.json"
    p = subprocess.run([sys.executable, str(root / "scripts" / "gpu_transfer.py"), "--out", str(out), "--preset",
                        "tiny", "--reps", "1"], capture_output=True, text=True, cwd=root,
                       env={**os.environ, "PYTHONPATH": str(root)})
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["seconds"]) == {"fp32_tree", "fp32_tree_threads", "fp16_tree_upcast"}
    assert all(t[0] > 0 for t in res["seconds"].values()) and res["leaves"] > 100 and res["upcast_compile_s"] > 0


@pytest.mark.parametrize("args,message", [
    (["--size", "-64"], "--size must be >= 1, got -64"),
    (["--size", "0"], "--size must be >= 1, got 0"),
    (["--size", "100"], "--size must be a multiple of 64, got 100"),
    (["--train", "--size", "17"], "--size must be a positive multiple of"),
    (["--images", "1,0"], "--images must be >= 1, got 0"),
    (["--iters", "0"], "--iters must be >= 1, got 0"),
    (["--memory", "--train"], "--memory only compiles the txt2img program"),
    (["--remat"], "--remat applies to --train only"),
    (["--json", "/nonexistent-dir/b.json"], "--json /nonexistent-dir/b.json: cannot write a file there"),
    (["--json", "/"], "--json /: is a directory"),
    (["--dtype", "float16"], "--dtype float16 cannot run on the CPU backend"),
    (["--preset", "sdxl-inpaint"], "--preset sdxl-inpaint: an inpainting U-Net only inpaints"),
])
def test_bench_bad_options_are_one_line_before_any_work(args, message, capsys):
    assert main(["bench", "--preset", "tiny", *args]) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert out.out == "" and len(lines) == 1 and lines[0].startswith(f"ldm-jax bench: error: {message}"), out.err


def test_bench_json_is_strict_and_training_rows_have_images_per_s():
    """A timing not taken (NaN: a training step too big to run here) is null in the JSON, which stays strict."""
    from ldm_jax.bench import Row, rows_as_dicts
    from ldm_jax.cli.cmd_bench import _no_nan

    rows = [Row("train_step", "ldm-jax", "cpu", "fp32", 4, 4, float("nan"), extra={"skipped": "too big"}),
            Row("train_step", "ldm-jax", "cpu", "fp32", 4, 4, 0.5)]
    text = json.dumps(_no_nan(rows_as_dicts(rows)), allow_nan=False)
    first, second = json.loads(text)
    assert first["seconds"] is None and first["images_per_s"] is None and second["images_per_s"] == 8.0


def test_bench_sdxl_kind_times_its_unet(tmp_path, capsys):
    """SDXL's U-Net step takes its vector conditioning, ours and diffusers' (--torch; labml has none: its VAE rows
    stay). (Its txt2img program: tests/test_sdxl_pipeline.py; --train: tests/test_train_sdxl.py.)"""
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny-xl", "--size", "64", "--images", "1", "--iters", "1", "--torch",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "labml has no U-Net of tiny-xl's kind" in printed and "ldm-jax / diffusers torch = " in printed
    rows = {(r["what"], r["impl"]) for r in json.loads(out.read_text())}
    assert rows == {(w, impl) for w in ("unet_step_cfg", "vae_decode") for impl in ("ldm-jax", "diffusers")} | {
        ("vae_decode", "labml-torch")}
