"""ldm_jax.train.data: folder scanning, image preprocessing and deterministic, resumable, sharded batches."""

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from ldm_jax.errors import UserError
from ldm_jax.train.data import Dataset, SmallImageWarning, UnreadableImage, batches, scan_dataset
from ldm_jax.train.example import load_image

RES = 8


def solid(path, color, size=(RES, RES), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def captioned(root, name, color, caption, **kw):
    solid(root / name, color, **kw)
    (root / name).with_suffix(".txt").write_text(caption)


def marked_dataset(root, n):
    """n images of distinct colours with a black marker at the top-left pixel (so flips are visible)."""
    for i in range(n):
        img = Image.new("RGB", (RES, RES), (10 * i, 255 - 10 * i, 100))
        img.putpixel((0, 0), (0, 0, 0))
        img.save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(f"caption {i}")
    return scan_dataset(root)


def take(it, k):
    return [next(it) for _ in range(k)]


def same(a, b):
    assert a["captions"] == b["captions"]
    np.testing.assert_array_equal(a["indices"], b["indices"])
    np.testing.assert_array_equal(a["images"], b["images"])


# ---- scanning -------------------------------------------------------------------------------------------------


def test_caption_files_recursive_sorted(tmp_path):
    captioned(tmp_path, "b.png", "red", "a red square\n")
    captioned(tmp_path, "a.JPG", "blue", "blue")
    captioned(tmp_path, "sub/c.webp", "green", "green one")
    captioned(tmp_path, ".hidden/d.png", "green", "ignored")
    (tmp_path / "notes.txt").write_text("not an image caption")
    ds = scan_dataset(tmp_path)
    assert isinstance(ds, Dataset) and len(ds) == 3
    assert [p.split("/")[-1] for p in ds.paths] == ["a.JPG", "b.png", "c.webp"]
    assert ds.captions == ("blue", "a red square", "green one")
    assert ds.root == str(tmp_path)


def test_metadata_jsonl_with_text_and_caption_columns(tmp_path):
    solid(tmp_path / "x.png", "red")
    solid(tmp_path / "imgs/y.png", "blue")
    rows = [{"file_name": "imgs/y.png", "text": "why"}, {"file_name": "x.png", "caption": "ex"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = scan_dataset(tmp_path)
    assert ds.paths == (str(tmp_path / "imgs/y.png"), str(tmp_path / "x.png"))
    assert ds.captions == ("why", "ex")


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    """Windows editors save UTF-8 with a byte-order mark: metadata.jsonl and caption files are read as utf-8-sig
    (the mark is neither a JSON error nor part of the caption)."""
    solid(tmp_path / "x.png", "red")
    row = json.dumps({"file_name": "x.png", "text": "ex"})
    (tmp_path / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + row.encode())
    assert scan_dataset(tmp_path).captions == ("ex",)
    other = tmp_path / "txt"
    solid(other / "y.png", "blue")
    (other / "y.txt").write_bytes("\ufeffa blue square".encode("utf-8"))
    assert scan_dataset(other).captions == ("a blue square",)


def test_metadata_jsonl_wins_over_caption_files(tmp_path):
    captioned(tmp_path, "a.png", "red", "from txt")
    captioned(tmp_path, "b.png", "red", "only in txt")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "from jsonl"}))
    ds = scan_dataset(tmp_path)
    assert ds.captions == ("from jsonl",) and len(ds) == 1


def test_missing_caption_names_file_unless_allowed(tmp_path):
    captioned(tmp_path, "a.png", "red", "ok")
    solid(tmp_path / "b.png", "red")
    captioned(tmp_path, "c.png", "red", "   ")
    with pytest.raises(UserError, match=r"b\.png.*b\.txt.*1 more.*allow.empty.captions"):
        scan_dataset(tmp_path)
    assert scan_dataset(tmp_path, allow_empty_captions=True).captions == ("ok", "", "")


def test_jsonl_missing_caption(tmp_path):
    solid(tmp_path / "a.png", "red")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png"}))
    with pytest.raises(UserError, match="no caption.*a.png"):
        scan_dataset(tmp_path)
    assert scan_dataset(tmp_path, allow_empty_captions=True).captions == ("",)


def test_empty_and_missing_and_not_a_directory(tmp_path):
    with pytest.raises(UserError, match="empty data directory"):
        scan_dataset(tmp_path)
    (tmp_path / "only.txt").write_text("caption without image")
    with pytest.raises(UserError, match="empty data directory"):
        scan_dataset(tmp_path)
    with pytest.raises(UserError, match="not found"):
        scan_dataset(tmp_path / "nope")
    with pytest.raises(UserError, match="not a directory"):
        scan_dataset(tmp_path / "only.txt")


def test_bad_jsonl_line_and_missing_file(tmp_path):
    solid(tmp_path / "a.png", "red")
    meta = tmp_path / "metadata.jsonl"
    meta.write_text(json.dumps({"file_name": "a.png", "text": "t"}) + "\n{not json\n")
    with pytest.raises(UserError, match=r"metadata\.jsonl:2: malformed JSON"):
        scan_dataset(tmp_path)
    meta.write_text(json.dumps({"file_name": "gone.png", "text": "t"}))
    with pytest.raises(UserError, match=r"metadata\.jsonl:1: image file not found: .*gone\.png"):
        scan_dataset(tmp_path)
    meta.write_text(json.dumps(["a.png", "t"]))
    with pytest.raises(UserError, match=r":1: expected a JSON object"):
        scan_dataset(tmp_path)


# ---- image loading ----------------------------------------------------------------------------------------------


def test_solid_red_exact_and_range(tmp_path):
    x = load_image(solid(tmp_path / "r.png", (255, 0, 0)), RES)
    assert x.dtype == np.float32 and x.shape == (RES, RES, 3)
    np.testing.assert_array_equal(x, np.broadcast_to(np.array([1, -1, -1], np.float32), x.shape))
    y = load_image(solid(tmp_path / "big.png", (255, 0, 0), size=(40, 24)), RES)  # downscaled
    np.testing.assert_array_equal(y, x)
    z = load_image(solid(tmp_path / "mid.png", (37, 128, 200), size=(13, 11)), RES)
    assert z.min() >= -1 and z.max() <= 1


def test_rgba_grayscale_palette(tmp_path):
    rgba = Image.new("RGBA", (RES, RES), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent -> white
    rgba.save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png", RES)
    np.testing.assert_array_equal(x[0, 0], [1, 1, 1])
    np.testing.assert_array_equal(x[1, 1], [1, -1, -1])
    np.testing.assert_allclose(load_image(solid(tmp_path / "g.png", 51, mode="L"), RES), 51 / 127.5 - 1)
    pal = Image.new("RGB", (RES, RES), (0, 255, 0)).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_image(tmp_path / "p.png", RES)[3, 3], [-1, 1, -1])
    g16 = Image.fromarray(np.full((RES, RES), 65535, np.uint16))
    g16.save(tmp_path / "g16.png")
    np.testing.assert_array_equal(load_image(tmp_path / "g16.png", RES), 1.0)


def test_exif_orientation(tmp_path):
    img = Image.new("RGB", (2 * RES, RES), (255, 0, 0))
    img.paste((0, 0, 255), (RES, 0, 2 * RES, RES))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display: left half -> top half
    img.save(tmp_path / "o.png", exif=exif)
    x = load_image(tmp_path / "o.png", RES)
    np.testing.assert_array_equal(x[: RES // 2, :, 2], -1)  # top: red
    np.testing.assert_array_equal(x[RES // 2 :, :, 2], 1)  # bottom: blue


def test_center_crop_keeps_centre_and_random_crop_moves(tmp_path):
    img = Image.new("RGB", (3 * RES, RES), (255, 0, 0))  # red | green | blue bands
    img.paste((0, 255, 0), (RES, 0, 2 * RES, RES))
    img.paste((0, 0, 255), (2 * RES, 0, 3 * RES, RES))
    img.save(tmp_path / "bands.png")
    x = load_image(tmp_path / "bands.png", RES)
    np.testing.assert_array_equal(x, np.broadcast_to(np.array([-1, 1, -1], np.float32), x.shape))
    crops = {load_image(tmp_path / "bands.png", RES, center_crop=False, rng=np.random.default_rng(s)).tobytes()
             for s in range(8)}
    assert len(crops) > 1


def test_flip_and_unreadable(tmp_path):
    img = Image.new("RGB", (RES, RES), (0, 0, 0))
    img.putpixel((0, 0), (255, 255, 255))
    img.save(tmp_path / "m.png")
    flips = {load_image(tmp_path / "m.png", RES, random_flip=True, rng=np.random.default_rng(s))[0, -1, 0]
             for s in range(16)}
    assert flips == {-1.0, 1.0}
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(UnreadableImage, match="bad.png"):
        load_image(tmp_path / "bad.png", RES)


def test_small_image_upscaled_with_warning(tmp_path):
    with pytest.warns(SmallImageWarning, match="4x4"):
        x = load_image(solid(tmp_path / "s.png", (255, 0, 0), size=(4, 4)), RES)
    assert x.shape == (RES, RES, 3)


# ---- batches ----------------------------------------------------------------------------------------------------


def test_batches_shapes_and_upscale_counts(tmp_path):
    captioned(tmp_path, "a.png", "red", "a")
    captioned(tmp_path, "b.png", "red", "b", size=(4, 6))
    it = batches(scan_dataset(tmp_path), batch_size=2, resolution=RES, seed=0)
    with pytest.warns(SmallImageWarning, match="b.png"):
        b = next(it)
    assert b["images"].shape == (2, RES, RES, 3) and b["images"].dtype == np.float32
    assert sorted(b["captions"]) == ["a", "b"] and b["indices"].dtype == np.int64
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file
        next(it)
    assert it.stats.upscaled == 2 and len(it.stats.upscaled_files) == 1 and it.stats.position == 4


def test_corrupt_file_skipped_counted_batch_still_full(tmp_path):
    ds = marked_dataset(tmp_path, 5)
    (tmp_path / "img02.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="unreadable.*img02"):
        got = take(batches(ds, batch_size=5, resolution=RES, seed=1), 3)
    for b in got:
        assert b["images"].shape[0] == 5 and 2 not in b["indices"]
    it = batches(ds, batch_size=5, resolution=RES, seed=1, num_workers=0)
    with pytest.warns(UserWarning):
        take(it, 3)
    assert it.stats.skipped >= 3 and it.stats.skipped_files == {str(tmp_path / "img02.png")}


def test_determinism_order_and_flips(tmp_path):
    ds = marked_dataset(tmp_path, 7)
    kw = dict(batch_size=3, resolution=RES, random_flip=True)
    a = take(batches(ds, seed=3, **kw), 4)
    b = take(batches(ds, seed=3, num_workers=0, **kw), 4)
    for x, y in zip(a, b):
        same(x, y)
    c = take(batches(ds, seed=4, **kw), 4)
    assert any(not np.array_equal(x["indices"], y["indices"]) for x, y in zip(a, c))
    flipped = [bool(img[0, -1, 0] == -1) for x in a for img in x["images"]]
    assert any(flipped) and not all(flipped)
    for x in a:  # caption matches the image
        assert x["captions"] == [f"caption {i}" for i in x["indices"]]
    # the first epoch's 6 samples (drop_last: 7 % 3 = 1 dropped) follow the (seed, epoch) permutation
    perm = np.random.default_rng([3, 0]).permutation(7)
    np.testing.assert_array_equal(np.concatenate([a[0]["indices"], a[1]["indices"]]), perm[:6])
    np.testing.assert_array_equal(a[2]["indices"], np.random.default_rng([3, 1]).permutation(7)[:3])


def test_drop_last_false_runs_across_epochs(tmp_path):
    ds = marked_dataset(tmp_path, 5)
    it = batches(ds, batch_size=2, resolution=RES, seed=0, drop_last=False)
    got = np.concatenate([b["indices"] for b in take(it, 5)])
    expected = np.concatenate([np.random.default_rng([0, e]).permutation(5) for e in (0, 1)])
    np.testing.assert_array_equal(got, expected)
    assert it.stats.position == 10 and it.stats.epoch == 2
    with pytest.raises(UserError, match="fewer than the global batch"):
        batches(ds, batch_size=3, num_shards=2, resolution=RES, seed=0)


def test_resume_from_position(tmp_path):
    ds = marked_dataset(tmp_path, 7)
    kw = dict(batch_size=3, resolution=RES, seed=5, random_flip=True, epoch_start=2)
    straight = take(batches(ds, **kw), 5)
    first = batches(ds, **kw)
    resumed = take(first, 2)
    resumed += take(batches(ds, position=first.stats.position, **kw), 3)
    for x, y in zip(straight, resumed):
        same(x, y)


def test_shards_interleave_to_global_batch(tmp_path):
    ds = marked_dataset(tmp_path, 9)
    (tmp_path / "img04.png").write_bytes(b"corrupt")
    kw = dict(resolution=RES, seed=2, random_flip=True, center_crop=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = take(batches(ds, batch_size=4, **kw), 4)
        shards = [take(batches(ds, batch_size=2, shard_index=k, num_shards=2, **kw), 4) for k in range(2)]
    for step, g in enumerate(single):
        parts = [shards[k][step] for k in range(2)]
        same(g, {key: (np.concatenate([p[key] for p in parts]) if key != "captions"
                       else parts[0][key] + parts[1][key]) for key in g})


def test_metadata_csv_as_hugging_face_imagefolder(tmp_path):
    """metadata.csv (header `file_name`, `text` or `caption`; quoted commas; a byte-order mark) is read like
    metadata.jsonl; it used to be ignored, and every image refused for a missing .txt caption."""
    solid(tmp_path / "imgs" / "a.png", "red")
    solid(tmp_path / "imgs" / "b.png", "red")
    (tmp_path / "metadata.csv").write_bytes(
        '\ufefffile_name,text\r\nimgs/b.png,"red, on white"\r\n\r\nimgs/a.png,caf\u00e9\r\n'.encode())
    ds = scan_dataset(tmp_path)
    assert [p.rsplit('/', 1)[-1] for p in ds.paths] == ["b.png", "a.png"] and ds.captions == ("red, on white", "café")
    (tmp_path / "metadata.csv").write_text("name,text\nimgs/a.png,x\n")
    with pytest.raises(UserError, match='metadata.csv: expected a header row with a "file_name" column'):
        scan_dataset(tmp_path)


def test_metadata_in_a_subfolder_is_named(tmp_path):
    """A Hugging Face split folder (DATA/train/metadata.jsonl) given as DATA: the error points at the folder."""
    solid(tmp_path / "train" / "a.png", "red")
    (tmp_path / "train" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n')
    with pytest.raises(UserError, match=r"metadata.jsonl is only read at the top of --data: pass --data .*train$"):
        scan_dataset(tmp_path)


def test_shuffled_tags_keep_the_first_ones_and_change_with_the_epoch(tmp_path):
    from ldm_jax.train.data import shuffle_tags

    tags = [f"tag{i}" for i in range(8)]
    captioned(tmp_path, "a.png", "red", "sks, " + ", ".join(tags) + ", ")
    captioned(tmp_path, "b.png", "blue", "plain caption")
    ds = scan_dataset(tmp_path)
    assert shuffle_tags(" x ,, y", np.random.default_rng(0)) in ("x, y", "y, x")  # stripped, empty tags dropped
    kw = dict(batch_size=2, resolution=RES, seed=0, num_workers=0, shuffle_caption=True, keep_tokens=1)
    with batches(ds, **kw) as it:
        epochs = [next(it)["captions"] for _ in range(4)]
    with batches(ds, **kw) as again:
        assert [next(again)["captions"] for _ in range(4)] == epochs  # deterministic
    shuffled = [c for e in epochs for c in e if c != "plain caption"]
    assert all(c.startswith("sks, ") and sorted(c.split(", ")[1:]) == tags for c in shuffled)
    assert len(set(shuffled)) == 4  # a new order every epoch
    with batches(ds, **{**kw, "shuffle_caption": False}) as plain:
        assert "sks, " + ", ".join(tags) + "," in next(plain)["captions"]  # as written (stripped)
