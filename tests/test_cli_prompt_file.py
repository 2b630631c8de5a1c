"""`ldm-jax txt2img | img2img | inpaint --from-file PROMPTS.txt`: one prompt a line, --n images each, one batch;
image k of prompt p is image i = p * n + k of the run (seed fold_in(seed, i)), named and labelled with its own
prompt, so `--prompt LINE --n i+1` draws it again; bad files are one line and exit 2 before anything loads."""

import os

import numpy as np
import pytest
from PIL import Image

from ldm_jax.cli.prompts import read_prompt_file
from ldm_jax.cli.main import main

FAST = ["--steps", "2", "--height", "32", "--width", "32", "--seed", "7"]  # the bundled model, small and quick


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im), dict(im.text)


def test_each_prompt_gets_n_images_named_and_seeded_as_documented(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"  # a BOM, CRLF, blank and blank-looking lines, spaces around a prompt
    prompts.write_bytes("\ufeffa red circle\r\n\r\n   \r\n  a blue square \r\n".encode("utf-8"))
    out = tmp_path / "out"
    assert main(["txt2img", "--from-file", str(prompts), "--n", "2", "--negative-prompt", "blurry", *FAST,
                 "--out", str(out)]) == 0
    assert "sampled 4 image(s)" in capsys.readouterr().out
    names = ["7-0000-a_red_circle.png", "7-0001-a_red_circle.png", "7-0002-a_blue_square.png",
             "7-0003-a_blue_square.png"]
    assert sorted(os.listdir(out)) == sorted([*names, "7-grid-prompts.png"])
    got = []
    for i, name in enumerate(names):
        pixels, text = _pixels(out / name)
        assert text["prompt"] == ("a red circle" if i < 2 else "a blue square"), name
        assert text["index"] == str(i) and text["seed"] == "7" and text["negative_prompt"] == "blurry"
        got.append(pixels)
    grid, text = _pixels(out / "7-grid-prompts.png")
    assert grid.shape == (2 * 32, 2 * 32, 3) and text["prompt"] == "a red circle\na blue square"
    np.testing.assert_array_equal(grid[32:, :32], got[2])  # row 2 = prompt 2, column 1 = its image 0

    # each prompt alone, with the file run's batch size (4: bit for bit), is the same image i = p * n + k
    for prompt in ("a red circle", "a blue square"):
        assert main(["txt2img", "--prompt", prompt, "--n", "4", "--negative-prompt", "blurry", *FAST,
                     "--out", str(tmp_path / prompt)]) == 0
    red, blue = ([_pixels(tmp_path / p / f"7-000{k}-{p.replace(' ', '_')}.png")[0] for k in range(4)]
                 for p in ("a red circle", "a blue square"))
    for i, expected in enumerate(red[:2] + blue[2:]):
        np.testing.assert_array_equal(got[i], expected, err_msg=names[i])
    assert not np.array_equal(got[2], blue[0])  # prompt 2 did not restart at image 0's noise
    assert not np.array_equal(got[0], got[1]) and not np.array_equal(got[1], got[2])


def test_img2img_from_a_file_names_each_image_after_its_prompt(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    (tmp_path / "p.txt").write_text("un cercle rouge, café\nx\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["img2img", "--from-file", str(tmp_path / "p.txt"), "--init", str(tmp_path / "i.png"), "--steps", "2",
                 "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["0-0000-un_cercle_rouge_caf.png", "0-0001-x.png", "0-grid-p.png"]
    assert _pixels(out / "0-0000-un_cercle_rouge_caf.png")[1]["prompt"] == "un cercle rouge, café"
    assert _pixels(out / "0-grid-p.png")[0].shape == (32, 64, 3)  # --n 1: a square grid in file order


def test_reading_a_prompt_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"one\rtwo\n\n\xe2\x98\x95 three \r\n")
    assert read_prompt_file(str(path)) == [(1, "one"), (2, "two"), (4, "\u2615 three")]


@pytest.mark.parametrize("content,message", [
    (None, "no such file"),
    ("dir", "is a directory, not a text file of prompts"),
    (b"a red circle\nun caf\xe9\n", "not UTF-8 text (line 2: byte 0xe9); save it as UTF-8"),
    (b"", "no prompt in it (one prompt a line; blank lines are skipped)"),
    (b"\xef\xbb\xbf\r\n  \n\t\r\n", "no prompt in it (one prompt a line; blank lines are skipped)"),
])
def test_a_bad_prompt_file_is_one_line_and_exit_2_before_loading(tmp_path, capsys, content, message):
    path = tmp_path / "prompts.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    assert main(["txt2img", "--from-file", str(path), *FAST, "--out", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert err == f"ldm-jax txt2img: error: --from-file {path}: {message}\n"
    assert "loading" not in out and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [["--prompt", "x", "--from-file", "p.txt"], []])
def test_exactly_one_of_prompt_and_from_file(tmp_path, capsys, args):
    with pytest.raises(SystemExit) as e:
        main(["inpaint", *args, "--init", "i.png", "--mask", "m.png", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    expected = "not allowed with argument --prompt" if args else "one of the arguments --prompt --from-file is required"
    assert expected in err and not (tmp_path / "out").exists()


def test_help_explains_the_prompt_file(capsys):
    with pytest.raises(SystemExit):
        main(["img2img", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for part in ("--from-file FILE", "one prompt a line", "BOM", "image i = p * n + k", "fold_in(seed, i)",
                 "N > i", "bit for bit", "a row per prompt", "one batch", "for every prompt"):
        assert part in text, part
