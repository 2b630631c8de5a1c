"""`ldm-jax bench` on the tiny preset: the rows it prints and writes, the torch ratio, compile-only memory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from ldm_jax.cli.main import main
from ldm_jax.configs import preset
from ldm_jax.models.build import abstract_params


def test_bench_unet_vae_and_torch_ratio(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--size", "64", "--images", "1", "--iters", "2", "--torch",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ldm-jax / labml torch = " in printed
    rows = {(r["what"], r["impl"]): r for r in json.loads(out.read_text())}
    assert set(rows) == {("unet_step_cfg", "ldm-jax"), ("unet_step_cfg", "labml-torch"), ("vae_decode", "ldm-jax")}
    assert all(r["seconds"] > 0 for r in rows.values())
    assert rows[("unet_step_cfg", "ldm-jax")]["batch"] == 2  # one image with classifier-free guidance
    assert rows[("unet_step_cfg", "ldm-jax")]["extra"]["cudnn_attention"] == 0  # XLA attention on the CPU


def test_bench_memory_is_compile_only_and_grows_with_the_batch(tmp_path):
    out = tmp_path / "mem.json"
    assert main(["bench", "--memory", "--preset", "tiny", "--size", "64", "--images", "1,4", "--steps", "4",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["images"] for r in rows] == [1, 4] and all(r["extra"]["compiled_only"] for r in rows)
    param_mb = sum(np.prod(s.shape) * 4 for s in jax.tree_util.tree_leaves(abstract_params(preset("tiny")))) / 2**20
    one, four = (r["extra"]["program_mb"] for r in rows)
    assert param_mb < one < four  # the fp32 params are arguments of the program; activations grow with the batch


def test_gpu_ab_script_runs_its_variants_on_the_cpu(tmp_path):
    """scripts/gpu_ab.py (run by hand on a GPU) must not rot between device sessions: two variants, tiny preset."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ab.json"
    p = subprocess.run([sys.executable, str(root / "scripts" / "gpu_ab.py"), "--out", str(out), "--preset", "tiny",
                        "--size", "64", "--steps", "2", "--iters", "1", "--variants", "baseline,norm_one_pass"],
                       capture_output=True, text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    base, one_pass = res["variants"]["baseline"], res["variants"]["norm_one_pass"]
    assert base["1"]["seconds"] > 0 and base["8"]["cudnn_attention"] == 0 and one_pass["8"]["seconds"] > 0
    assert abs(one_pass["8"]["image_mean"] - base["8"]["image_mean"]) < 1.0  # same images up to rounding
    assert res["first_image_warm_cache_s"] > 0
