"""`ldm-jax bench` on the tiny preset: the rows it prints and writes, the torch ratio, compile-only memory."""

import json

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
