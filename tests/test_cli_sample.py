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


def test_txt2img_writes_pngs_with_metadata_and_a_grid(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    negative = " ".join(["blurry"] * 80)  # 80 tokens: CLIP reads 75, the CLI says so
    assert main(["txt2img", "--checkpoint", ckpt, "--prompt", "a red circle", "--negative-prompt", negative,
                 "--n", "3", "--steps", "4", "--height", "16", "--width", "24", "--seed", "7", "--sampler", "euler_a",
                 "--scale", "5", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: --negative-prompt is 80 tokens; the text encoder reads the first 75" in err
    assert "--prompt is" not in err
    files = sorted(os.listdir(out))
    assert len([f for f in files if "-grid-" not in f]) == 3 and any("-grid-" in f for f in files)
    with Image.open(out / files[0]) as im:
        assert im.size == (24, 16)
        meta = im.text
    assert meta["prompt"] == "a red circle" and meta["negative_prompt"] == negative and meta["seed"] == "7"
    assert meta["sampler"] == "euler_a" and meta["steps"] == "4" and meta["scale"] == "5.0"
    assert meta["dtype"] == "float32"
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


def test_a_rerun_into_the_same_folder_never_overwrites(ckpt, tmp_path):
    """Names used to be <seed>-<index>-<prompt>.png only: a second run replaced the first one's images and grid
    (and --n 2 after --n 4 left a mix). Now a later run's files all get the first free suffix, and every file gets
    the normal mode (0666 & ~umask, not mkstemp's 0600)."""
    out = tmp_path / "out"
    args = ["txt2img", "--checkpoint", ckpt, "--prompt", "a red circle", "--steps", "2", "--height", "16",
            "--width", "16", "--seed", "7", "--out", str(out)]
    old_umask = os.umask(0o022)
    try:
        assert main([*args, "--n", "3"]) == 0
        first = {f: (out / f).read_bytes() for f in os.listdir(out)}
        assert main([*args, "--n", "2", "--scale", "3"]) == 0
        assert main([*args, "--n", "1", "--scale", "2"]) == 0
    finally:
        os.umask(old_umask)
    assert sorted(first) == ["7-0000-a_red_circle.png", "7-0001-a_red_circle.png", "7-0002-a_red_circle.png",
                             "7-grid-a_red_circle.png"]
    assert sorted(os.listdir(out)) == sorted([*first, "7-0000-a_red_circle-2.png", "7-0001-a_red_circle-2.png",
                                              "7-grid-a_red_circle-2.png", "7-0000-a_red_circle-3.png"])
    assert all((out / f).read_bytes() == data for f, data in first.items())
    with Image.open(out / "7-0001-a_red_circle-2.png") as im:
        assert im.text["scale"] == "3.0" and im.text["index"] == "1"
    assert {os.stat(out / f).st_mode & 0o777 for f in os.listdir(out)} == {0o644}


def test_inpaint_keeps_the_transparent_areas_of_an_rgba_mask(ckpt, tmp_path):
    """A white stroke on a transparent layer (as image editors export it): only the stroke is repainted. On white,
    as init images are, the transparent area counted as "repaint" and the whole image changed."""
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    pixels = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(init)
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[4:12, 4:12, 3] = 255
    Image.fromarray(rgba).save(mask)
    assert main(["inpaint", "--checkpoint", ckpt, "--prompt", "x", "--init", str(init), "--mask", str(mask),
                 "--steps", "2", "--out", str(tmp_path / "b")]) == 0
    (png,) = os.listdir(tmp_path / "b")
    with Image.open(tmp_path / "b" / png) as im:
        out = np.asarray(im)
    keep = rgba[..., 3] == 0
    np.testing.assert_array_equal(out[keep], pixels[keep])
    assert not np.array_equal(out[~keep], pixels[~keep])


def test_help_names_the_real_files_and_the_limits(capsys):
    with pytest.raises(SystemExit) as e:
        main(["inpaint", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for part in ("OUT/<seed>-<index>-<prompt>.png", "OUT/<seed>-grid-<prompt>.png", "never overwritten",
                 "[0, 2^32)", "3, 9, 27, 36, 37, 101-111, 251-333, over 500", "transparent areas are kept",
                 "float16 needs a GPU/TPU"):
        assert part in text, part


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
    (["inpaint", "--init", "{init}", "--mask", "{small}"], "the mask is 8x8 (width x height) but the image is 16x16"),
    (["txt2img", "--checkpoint", "nowhere.safetensors"], "nowhere.safetensors: no such file or directory"),
    (["txt2img", "--seed", "-1"], "--seed must be in [0, 2^32) = [0, 4294967295], got -1"),
    (["txt2img", "--seed", str(2**32)], "--seed must be in [0, 2^32) = [0, 4294967295], got 4294967296"),
    (["txt2img", "--dtype", "float16"], "--dtype float16 cannot run on the CPU backend"),
    (["img2img", "--init", "{odd}"], "odd.png: the image is 24 wide and 60 high; img2img and inpaint need both"),
    (["inpaint", "--init", "{init}", "--mask", "{odd}"], "odd.png: the mask is 24x60 (width x height) but the image"),
    (["img2img", "--init", "{out}"], "out: is a directory, not an image file"),
    (["txt2img", "--out", "{init}"], "init.png: exists and is not a directory"),
    (["txt2img", "--out", ""], "--out must name a directory, got an empty string"),
    (["txt2img", "--out", "{init}/sub"], "init.png is not a directory"),
])
def test_bad_input_is_one_line_and_exit_2(ckpt, tmp_path, args, message):
    init, small = tmp_path / "init.png", tmp_path / "small.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(init)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(small)
    Image.fromarray(np.zeros((60, 24, 3), np.uint8)).save(tmp_path / "odd.png")
    (tmp_path / "out").mkdir()
    args = [a.format(init=init, small=small, odd=tmp_path / "odd.png", out=tmp_path / "out") for a in args]
    base = ["--prompt", "x"] + ([] if "--out" in args else ["--out", str(tmp_path / "out")])
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
    if "--checkpoint" not in args:
        assert "loading" not in out  # refused before loading, compiling or sampling
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_an_init_image_over_the_decompression_bomb_limit_is_one_line(ckpt, tmp_path, monkeypatch, capsys):
    """PIL's DecompressionBombWarning went on to a run that died of RESOURCE_EXHAUSTED with a traceback."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # as if 16x16 were 12000x12000
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "init.png")
    assert main(["img2img", "--checkpoint", ckpt, "--prompt", "x", "--init", str(tmp_path / "init.png"),
                 "--steps", "2", "--out", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"ldm-jax img2img: error: {tmp_path / 'init.png'}: the image has ") and "resize it" in err
    assert len(err.splitlines()) == 1 and "loading" not in out and not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["compiling", "sampling"])
def test_running_out_of_memory_is_one_line(ckpt, tmp_path, monkeypatch, capsys, where):
    """XLA's RESOURCE_EXHAUSTED (a 12000x12000 init image: 129 GB) was a traceback."""
    import jax

    from ldm_jax import warm_start
    from ldm_jax.pipelines import generate

    def oom(*a, **k):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 129024004752 bytes.\nmore")

    if where == "compiling":
        monkeypatch.setattr(warm_start, "load_while_compiling", oom)
    else:
        monkeypatch.setattr(warm_start, "peek_config", lambda path: None)  # load first, then sample
        monkeypatch.setattr(generate, "generate", oom)
    Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(tmp_path / "init.png")
    assert main(["img2img", "--checkpoint", ckpt, "--prompt", "x", "--init", str(tmp_path / "init.png"),
                 "--steps", "2", "--n", "3", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == ("ldm-jax img2img: error: out of memory for 3 24x16 image(s): RESOURCE_EXHAUSTED: Out of memory "
                   "allocating 129024004752 bytes.; lower --n or use a smaller --init image\n")
    assert not (tmp_path / "out").exists()


def test_an_all_black_mask_is_named_in_a_warning(ckpt, tmp_path, capsys):
    """Nothing to repaint: the run used to finish silently with the init image as its output."""
    pixels = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "init.png")
    Image.fromarray(np.full((16, 16), 127, np.uint8)).save(tmp_path / "mask.png")  # under 50% gray: keep
    assert main(["inpaint", "--checkpoint", ckpt, "--prompt", "x", "--init", str(tmp_path / "init.png"), "--mask",
                 str(tmp_path / "mask.png"), "--steps", "2", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert f"warning: {tmp_path / 'mask.png'}: the mask is black everywhere (below 50% gray)" in err
    (png,) = os.listdir(tmp_path / "out")
    with Image.open(tmp_path / "out" / png) as im:
        np.testing.assert_array_equal(np.asarray(im), pixels)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_an_unwritable_out_fails_before_loading(ckpt, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        rc, out, err = run_cli("txt2img", "--checkpoint", ckpt, "--prompt", "x", "--steps", "2", "--height", "16",
                               "--width", "16", "--out", locked / "new")
    finally:
        locked.chmod(0o700)
    assert rc == 2 and "cannot write to" in err and "loading" not in out and len(err.strip().splitlines()) == 1
