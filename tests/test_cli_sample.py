"""`ldm-jax txt2img | img2img | inpaint | verify | random-checkpoint` from the command line: files, PNG metadata,
grids, and one-line errors with a non-zero exit for bad input."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ldm_jax.cli.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny.safetensors"
    assert main(["random-checkpoint", str(path), "--preset", "tiny", "--seed", "3"]) == 0
    return str(path)


def run_cli(*args, env=None):
    """A real process, as users run it: (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "ldm_jax", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=None if env is None else {**os.environ, **env})
    return p.returncode, p.stdout, p.stderr


def test_txt2img_writes_pngs_with_metadata_and_a_grid(ckpt, tmp_path):
    out = tmp_path / "out"
    assert main(["txt2img", "--checkpoint", ckpt, "--prompt", "a red circle", "--negative-prompt", "blurry",
                 "--n", "3", "--steps", "4", "--height", "16", "--width", "24", "--seed", "7", "--sampler", "euler_a",
                 "--scale", "5", "--out", str(out)]) == 0
    files = sorted(os.listdir(out))
    assert len([f for f in files if "-grid-" not in f]) == 3 and any("-grid-" in f for f in files)
    with Image.open(out / files[0]) as im:
        assert im.size == (24, 16)
        meta = im.text
    assert meta["prompt"] == "a red circle" and meta["negative_prompt"] == "blurry" and meta["seed"] == "7"
    assert meta["sampler"] == "euler_a" and meta["steps"] == "4" and meta["scale"] == "5.0"
    with Image.open(next(out / f for f in files if "-grid-" in f)) as grid:
        assert grid.size == (2 * 24, 2 * 16)
    assert not [f for f in files if f.startswith(".tmp")]


def test_compiled_program_is_cached_across_processes_unless_step_progress(ckpt, tmp_path):
    """By default (a small model) the CLI shows elapsed time, so the program has no host callback and JAX's
    persistent cache keeps it for the next process; --step-progress's per-step callback keeps its program out."""
    env = {"LDM_JAX_CACHE_DIR": str(tmp_path / "cache")}
    programs = lambda: [f for f in os.listdir(tmp_path / "cache") if f.startswith("jit_run")]  # noqa: E731
    args = ("txt2img", "--checkpoint", ckpt, "--prompt", "x", "--steps", "4", "--height", "32", "--width", "32")
    code, _, err = run_cli(*args, "--out", tmp_path / "a", env=env)
    assert code == 0, err
    assert len(programs()) == 1
    code, _, err = run_cli(*args, "--step-progress", "--out", tmp_path / "b", env=env)
    assert code == 0, err
    assert len(programs()) == 1 and len(os.listdir(tmp_path / "b")) == 1


def test_a_second_process_reads_the_compiled_program_and_saves_the_same_image(ckpt, tmp_path):
    """The program cache (ldm_jax/program_cache.py) across real processes: the first run stores the program,
    the second loads it without tracing and draws the same pixels."""
    env = {"LDM_JAX_CACHE_DIR": str(tmp_path / "cache"), "LDM_JAX_NO_PROGRAM_CACHE": "0"}
    args = ("txt2img", "--checkpoint", ckpt, "--prompt", "x", "--steps", "4", "--height", "32", "--width", "32")
    code, out_a, err = run_cli(*args, "--out", tmp_path / "a", env=env)
    assert code == 0, err
    assert "compiled and saved to the program cache" in out_a
    code, out_b, err = run_cli(*args, "--out", tmp_path / "b", env=env)
    assert code == 0, err
    assert "read from the program cache" in out_b
    (a,), (b,) = os.listdir(tmp_path / "a"), os.listdir(tmp_path / "b")
    with Image.open(tmp_path / "a" / a) as im_a, Image.open(tmp_path / "b" / b) as im_b:
        np.testing.assert_array_equal(np.asarray(im_a), np.asarray(im_b))


def test_img2img_and_inpaint(ckpt, tmp_path):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(init)
    m = np.zeros((16, 16), np.uint8)
    m[4:12, 4:12] = 255
    Image.fromarray(m).save(mask)
    assert main(["img2img", "--checkpoint", ckpt, "--prompt", "x", "--init", str(init), "--strength", "0.5",
                 "--steps", "4", "--out", str(tmp_path / "a")]) == 0
    assert main(["inpaint", "--checkpoint", ckpt, "--prompt", "x", "--init", str(init), "--mask", str(mask),
                 "--steps", "4", "--out", str(tmp_path / "b")]) == 0
    (png,) = os.listdir(tmp_path / "b")
    with Image.open(tmp_path / "b" / png) as im:
        out = np.asarray(im)
        assert im.text["strength"] == "1.0" and im.text["mode"] == "inpaint"
    np.testing.assert_array_equal(out[m == 0], pixels[m == 0])


def test_verify_passes_on_a_good_checkpoint(ckpt, capsys):
    assert main(["verify", ckpt, "--components", "unet,text_encoder", "--latent-size", "8x8"]) == 0
    assert "parity OK" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["txt2img", "--height", "20"], "height must be a positive multiple of 8"),
    (["txt2img", "--n", "0"], "--n must be >= 1"),
    (["txt2img", "--steps", "0"], "steps must be an integer >= 1"),
    (["txt2img", "--steps", "3"], "3 DDIM/PLMS steps do not fit T=1000"),
    (["txt2img", "--sampler", "heun"], "invalid choice: 'heun'"),
    (["img2img", "--init", "missing.png"], "missing.png: no such image file"),
    (["img2img", "--init", "{init}", "--strength", "1.5"], "strength must be in [0, 1]"),
    (["inpaint", "--init", "{init}", "--mask", "{small}"], "the mask is 8x8 but the image is 16x16"),
    (["txt2img", "--checkpoint", "nowhere.safetensors"], "nowhere.safetensors: no such file or directory"),
])
def test_bad_input_is_one_line_and_exit_2(ckpt, tmp_path, args, message):
    init, small = tmp_path / "init.png", tmp_path / "small.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(init)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(small)
    args = [a.format(init=init, small=small) for a in args]
    base = ["--prompt", "x", "--out", str(tmp_path / "out")]
    if "--steps" not in args:
        base += ["--steps", "2"]
    if "--checkpoint" not in args:
        base += ["--checkpoint", ckpt]
    if args[0] == "txt2img" and "--height" not in args:
        base += ["--height", "16", "--width", "16"]
    rc, out, err = run_cli(*args, *base)
    assert rc == 2, (out, err)
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
