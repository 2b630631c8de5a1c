"""ldm_jax.images: reading 16-bit and transparent images and masks, PNG output that gets the normal file mode and
never replaces an existing file (fresh names shared by one run, safe against a concurrent run)."""

import errno
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from ldm_jax import images as imio
from ldm_jax.errors import UserError


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _files(d):
    return sorted(os.listdir(d))


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im)


def test_16_bit_grayscale_is_scaled_to_8_bits_not_clipped(tmp_path):
    """PIL's convert("RGB") clips I;16 at 255: a mid-gray 16-bit photo became white."""
    levels = np.array([[0, 257, 128 * 257, 65535]], np.uint16)
    Image.fromarray(levels).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode in ("I;16", "I")
    rgb = imio.read_image(str(tmp_path / "g16.png"))
    assert rgb.shape == (1, 4, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 1, 128, 255])
    assert (rgb == rgb[..., :1]).all()
    wide = imio._to_rgb(Image.fromarray(np.array([[-5, 0, 32896, 70000]], np.int32)), imio.WHITE)
    np.testing.assert_array_equal(np.asarray(wide)[0, :, 1], [0, 0, 128, 255])
    mask = imio.read_mask(str(tmp_path / "g16.png"))
    np.testing.assert_allclose(mask[0], [0, 1 / 255, 128 / 255, 1], atol=1e-6)


def test_transparent_mask_areas_are_kept_while_init_images_are_laid_on_white(tmp_path):
    """A white stroke on a transparent layer repaints under the stroke only (transparent = keep), whatever colour
    the transparent pixels hold; an init image's transparency still becomes white."""
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255  # transparent white outside the stroke: must not count as "repaint"
    rgba[2:5, 2:5, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "m.png")
    expected = np.zeros((8, 8), np.float32)
    expected[2:5, 2:5] = 1
    np.testing.assert_array_equal(imio.read_mask(str(tmp_path / "m.png")), expected)
    la = np.stack([np.full((8, 8), 255, np.uint8), (expected * 255).astype(np.uint8)], -1)
    Image.fromarray(la).save(tmp_path / "la.png")
    np.testing.assert_array_equal(imio.read_mask(str(tmp_path / "la.png")), expected)
    rgba[..., :3] = 0
    Image.fromarray(rgba).save(tmp_path / "i.png")
    init = imio.read_image(str(tmp_path / "i.png"))
    assert (init[0, 0] == 255).all() and (init[3, 3] == 0).all()


def test_float_tiffs_in_0_1_are_scaled_and_floats_in_0_255_kept(tmp_path):
    """A 32-bit float TIFF (mode F) holds 0..1 by convention; PIL's convert read it as 0..255, so a mid-gray
    became black (level 0 or 1). Floats beyond 1 keep PIL's 0..255 reading."""
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), mode="F").save(tmp_path / "unit.tif")
    np.testing.assert_array_equal(imio.read_image(str(tmp_path / "unit.tif"))[0, :, 0], [0, 128, 255])
    Image.fromarray(np.array([[0.0, 128.0, 300.0]], np.float32), mode="F").save(tmp_path / "255.tif")
    np.testing.assert_array_equal(imio.read_image(str(tmp_path / "255.tif"))[0, :, 1], [0, 128, 255])
    Image.fromarray(np.array([[0.0, np.nan]], np.float32), mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(UserError, match="nan.tif: cannot read image .*NaN"):
        imio.read_image(str(tmp_path / "nan.tif"))


def test_an_image_over_the_decompression_bomb_limit_is_one_clear_error(tmp_path, monkeypatch):
    """Over Image.MAX_IMAGE_PIXELS PIL only warned (two lines), and the run went on to an out-of-memory traceback
    (a 12000x12000 init image asked XLA for 129 GB); over twice the limit the error said "DOS attack"."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # as if 40x40 were 12000x12000
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(tmp_path / "huge.png")  # over 2x: PIL's own error
    for name in ("big.png", "huge.png"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # and no warning escapes
            with pytest.raises(UserError) as e:
                imio.read_image(str(tmp_path / name))
        assert str(e.value).startswith(f"{tmp_path / name}: the image has ") and str(e.value).endswith("resize it")
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(tmp_path / "ok.png")
    assert imio.read_image(str(tmp_path / "ok.png")).shape == (30, 30, 3)


def test_a_directory_or_a_file_that_is_no_image_is_named_plainly(tmp_path):
    (tmp_path / "d.png").mkdir()
    (tmp_path / "t.png").write_text("hello")
    with pytest.raises(UserError, match=r"d.png: is a directory, not an image file$"):
        imio.read_image(str(tmp_path / "d.png"))
    with pytest.raises(UserError, match=r"t.png: not an image file \(or not a format PIL can read\)$"):
        imio.read_mask(str(tmp_path / "t.png"))


def test_pil_init_images_of_any_mode_are_read_as_files_are(tmp_path):
    """The Python API took only RGB: an RGBA or 16-bit PIL image was refused with "convert to RGB first", and
    PIL's convert("RGB") clips 16-bit gray at 255 (a mid-gray photo turned white)."""
    g16 = Image.fromarray(np.array([[0, 128 * 257, 65535]], np.uint16))
    np.testing.assert_allclose(imio.to_unit_range(g16)[0, :, 0], [-1, 128 / 127.5 - 1, 1], atol=1e-6)
    rgba = Image.fromarray(np.array([[[0, 0, 0, 0], [0, 0, 0, 255]]], np.uint8))
    np.testing.assert_array_equal(imio.to_unit_range(rgba)[0, :, 2], [1, -1])  # transparent: white
    batch = imio.to_unit_range([g16, g16.convert("I")])
    assert batch.shape == (2, 1, 3, 3)
    with pytest.raises(UserError, match="one size"):
        imio.to_unit_range([g16, Image.new("RGB", (2, 1))])
    with pytest.raises(UserError, match="got the path 'x.png': read it with ldm_jax.images.read_image"):
        imio.to_unit_range("x.png")


def test_save_png_gets_the_normal_file_mode(tmp_path, umask_022):
    """mkstemp's 0600 used to survive the rename: other users could not read the outputs."""
    imio.save_png(str(tmp_path / "a.png"), np.zeros((4, 4, 3), np.uint8), {"seed": 1})
    assert os.stat(tmp_path / "a.png").st_mode & 0o777 == 0o644
    (path,) = imio.save_new_pngs(str(tmp_path), [("b", np.zeros((4, 4, 3), np.uint8), None)])
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert _files(tmp_path) == ["a.png", "b.png"]


def test_save_new_pngs_never_replaces_and_a_run_shares_one_suffix(tmp_path):
    d = str(tmp_path)
    img = lambda v: np.full((4, 4, 3), v, np.uint8)  # noqa: E731
    first = imio.save_new_pngs(d, [("7-0000-x", img(1), None), ("7-0001-x", img(2), None), ("7-grid-x", img(3), None)])
    assert [os.path.basename(p) for p in first] == ["7-0000-x.png", "7-0001-x.png", "7-grid-x.png"]
    # a later run with fewer images: one of its names is free, but the run takes the next suffix for all of them
    os.rename(os.path.join(d, "7-0001-x.png"), os.path.join(d, "kept.png"))
    second = imio.save_new_pngs(d, [("7-0000-x", img(4), None), ("7-0001-x", img(5), None)])
    assert [os.path.basename(p) for p in second] == ["7-0000-x-2.png", "7-0001-x-2.png"]
    third = imio.save_new_pngs(d, [("7-0000-x", img(6), None)])
    assert [os.path.basename(p) for p in third] == ["7-0000-x-3.png"]
    assert _pixels(first[0])[0, 0, 0] == 1 and _pixels(second[0])[0, 0, 0] == 4 and _pixels(third[0])[0, 0, 0] == 6
    assert not [f for f in _files(d) if f.startswith(".tmp")]


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_name_taken_after_the_check_is_not_replaced(tmp_path, monkeypatch, hard_links):
    """A concurrent run takes a name between the free-name check and the save: its file stays, and this run moves
    to the next suffix as a whole (also on file systems without hard links)."""
    d = str(tmp_path)
    Image.fromarray(np.full((4, 4, 3), 9, np.uint8)).save(tmp_path / "b.png")
    real = imio.first_free_run
    calls = []

    def racy_first_free_run(directory, stems, start=1):
        calls.append(start)
        return start if len(calls) == 1 else real(directory, stems, start)  # the first check misses b.png

    monkeypatch.setattr(imio, "first_free_run", racy_first_free_run)
    if not hard_links:
        def no_link(src, dst):
            raise OSError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_link)
    paths = imio.save_new_pngs(d, [("a", np.zeros((4, 4, 3), np.uint8), None),
                                   ("b", np.ones((4, 4, 3), np.uint8), None)])
    assert [os.path.basename(p) for p in paths] == ["a-2.png", "b-2.png"]
    assert _files(d) == ["a-2.png", "b-2.png", "b.png"]
    assert _pixels(tmp_path / "b.png")[0, 0, 0] == 9 and _pixels(tmp_path / "b-2.png")[0, 0, 0] == 1


def test_an_interrupted_save_leaves_no_part_of_its_run(tmp_path, monkeypatch):
    """A Ctrl-C between two files of a run: the files already in place are removed too (one image of two and no
    grid was left before)."""
    from ldm_jax import images as imio

    claim, calls = imio._claim, []

    def claim_then_interrupt(tmp, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return claim(tmp, path)

    monkeypatch.setattr(imio, "_claim", claim_then_interrupt)
    items = [(f"0-000{i}-x", np.zeros((8, 8, 3), np.uint8), {"prompt": "x"}) for i in range(3)]
    with pytest.raises(KeyboardInterrupt):
        imio.save_new_pngs(str(tmp_path), items)
    assert os.listdir(tmp_path) == []


def test_an_output_name_too_long_for_the_file_system_is_refused_before_the_work(tmp_path, monkeypatch):
    from ldm_jax.compile_cache import cache_dir
    from ldm_jax.errors import UserError
    from ldm_jax.output_dirs import check_can_write_dir

    with pytest.raises(UserError, match="longer than the file system allows"):
        check_can_write_dir(str(tmp_path / ("a" * 300) / "b"), "--out x")
    check_can_write_dir(str(tmp_path / ("a" * 200) / "b"), "--out x")  # fine: nothing is created
    assert os.listdir(tmp_path) == []
    monkeypatch.setenv("HOME", str(tmp_path))  # and a cache directory given with ~ is expanded, as by a shell
    monkeypatch.setenv("LDM_JAX_CACHE_DIR", "~/cache")
    assert cache_dir() == str(tmp_path / "cache")


def test_a_full_disk_names_the_output_folder(tmp_path, monkeypatch):
    def no_space(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", no_space)
    with pytest.raises(OSError) as e:
        imio.save_new_pngs(str(tmp_path), [("a", np.zeros((4, 4, 3), np.uint8), None)])
    assert e.value.filename == str(tmp_path) and os.listdir(tmp_path) == []
