"""Aspect-ratio buckets (`ldm-jax train --aspect-buckets`, `ldm_jax/train/buckets.py`): the bucket sizes, the
assignment by aspect ratio (EXIF orientation included), the epoch order (one bucket per step, deterministic,
resumable, sharded), the crop to a bucket, the latent cache per bucket, and a run: one compiled step per bucket,
SDXL's target size = the bucket, stop + resume = a straight run."""

import json

import numpy as np
import pytest
from PIL import Image

from ldm_jax.errors import UserError
from ldm_jax.train import buckets as B
from ldm_jax.train.data import batches, scan_dataset
from ldm_jax.train.example import read_example


def test_sizes_follow_kohyas_rule_at_512_and_sdxls_list_at_1024():
    sizes = B.bucket_sizes(512, 64)
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in sizes)
    assert {(w, h) for w, h in sizes} == {(h, w) for w, h in sizes}  # every portrait has its landscape
    assert [w / h for w, h in sizes] == sorted(w / h for w, h in sizes)
    # kohya-ss' default buckets at 512 (min 256, max 1024, step 64) include these; SDXL's published list these
    assert {(512, 512), (448, 576), (384, 640), (320, 768), (256, 1024), (1024, 256)} <= set(sizes)
    assert {(1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1536, 640)} <= set(B.bucket_sizes(1024, 64))
    assert B.bucket_step(512, 64) == 64 and B.bucket_step(1024, 32) == 64 and B.bucket_step(16, 4) == 4
    assert B.bucket_step(72, 8) == 8 and B.bucket_step(96, 4) == 12  # always a multiple of the model's


def test_nearest_bucket_and_exif_orientation(tmp_path):
    sizes = B.bucket_sizes(512, 64)
    assert sizes[B.nearest_bucket((1920, 1080), sizes)] == (640, 384)  # 16:9 -> 1.67 (1.78)
    assert sizes[B.nearest_bucket((1000, 1000), sizes)] == (512, 512)
    assert sizes[B.nearest_bucket((100, 1000), sizes)] == (256, 1024)  # past the widest: the extreme bucket
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the stored 60x30 shows as 30x60
    Image.new("RGB", (60, 30)).save(tmp_path / "r.jpg", exif=exif)
    assert B.image_size(tmp_path / "r.jpg") == (30, 60)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert B.image_size(tmp_path / "bad.png") is None


def test_read_example_covers_then_crops_the_bucket(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 90, 3), dtype=np.uint8)  # (h, w) = (40, 90)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    ex = read_example(tmp_path / "x.png", (60, 24), True, False, None)  # cover: x 0.667 -> 60x26, crop 1 row
    assert ex.pixels.shape == (24, 60, 3) and ex.resized_size == (60, 26) and ex.crop_top_left == (1, 0)
    expect = np.asarray(Image.fromarray(pixels).resize((60, 26), Image.Resampling.BILINEAR), np.float32)[1:25]
    np.testing.assert_array_equal(ex.pixels, expect / 127.5 - 1)
    square = read_example(tmp_path / "x.png", 16, True, False, None)  # the square path is torchvision's Resize
    assert square.resized_size == (int(16 * 90 / 40), 16) and square.pixels.shape == (16, 16, 3)


def _shaped_dataset(root, sizes):
    """One image per (width, height) in `sizes`, each a different colour, captioned by its index."""
    root.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (20 * i % 256, 200 - 10 * i % 200, 90)).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"image {i}")
    return scan_dataset(root)


def test_epoch_order_one_bucket_per_step_resume_and_shards(tmp_path):
    ds = _shaped_dataset(tmp_path / "d", [(40, 24)] * 9 + [(24, 40)] * 7 + [(32, 32)] * 3)
    plan = B.plan(ds.paths, 16, 4)
    assert [plan.sizes[b] for b in plan.of_image[[0, 9, 16]]] == [(20, 12), (12, 20), (16, 16)]
    assert plan.epoch_length(4) == 12  # 9 -> 8, 7 -> 4, 3 -> 0 per epoch
    kw = dict(batch_size=2, resolution=16, seed=3, num_workers=0, buckets=plan, group=2)
    with batches(ds, **kw) as it:
        got = [next(it) for _ in range(12)]  # two epochs
    for step in range(6):  # both micro-batches of a step come from one bucket, and the batch has its shape
        a, b = got[2 * step], got[2 * step + 1]
        assert len({plan.of_image[i] for i in [*a["indices"], *b["indices"]]}) == 1
        w, h = plan.sizes[plan.of_image[a["indices"][0]]]
        assert a["images"].shape == b["images"].shape == (2, h, w, 3)
    first = np.concatenate([g["indices"] for g in got[:6]])
    assert len(set(first.tolist())) == 12 and not set(first.tolist()) & set(range(16, 19))
    assert it.stats.position == 19 + 12 and it.stats.epoch == 2  # positions count in epochs of n = 19 samples
    with batches(ds, **{**kw, "position": 19 + 4}) as resumed:  # from step 2 of the second epoch
        for want in got[8:]:
            np.testing.assert_array_equal(next(resumed)["images"], want["images"])
    shards = [batches(ds, **{**kw, "batch_size": 1, "shard_index": s, "num_shards": 2}) for s in (0, 1)]
    for want in got[:4]:  # host s gets rows s of every global batch
        rows = [next(sh) for sh in shards]
        np.testing.assert_array_equal(np.concatenate([r["indices"] for r in rows]), want["indices"])
    for sh in shards:
        sh.close()
    with pytest.raises(UserError, match="no bucket holds 10 images"):
        batches(ds, **{**kw, "batch_size": 5})


def test_an_unreadable_image_is_replaced_from_its_bucket(tmp_path):
    ds = _shaped_dataset(tmp_path / "d", [(40, 24)] * 4 + [(24, 40)] * 4)
    noise = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "d" / "00.png")
    with open(ds.paths[0], "r+b") as f:  # header intact (bucketed by it), pixel data cut off
        f.truncate(200)
    plan = B.plan(ds.paths, 16, 4)
    assert plan.of_image.tolist() == [plan.of_image[1]] * 4 + [plan.of_image[4]] * 4
    with pytest.warns(UserWarning, match="skipping unreadable"):
        with batches(ds, batch_size=4, resolution=16, seed=0, num_workers=0, buckets=plan) as it:
            rows = [next(it) for _ in range(2)]
    for r in rows:
        assert len({plan.of_image[i] for i in r["indices"]}) == 1 and 0 not in r["indices"].tolist()


def test_latent_cache_per_bucket_matches_the_encoder(tmp_path):
    from ldm_jax.train import latent_cache
    from ldm_jax.train.base import load_base
    from tests.parity import rel_err

    ds = _shaped_dataset(tmp_path / "d", [(40, 24)] * 2 + [(24, 40)] * 2)
    sd = load_base(None, "tiny-xl", 0)
    plan = B.plan(ds.paths, 16, 4)
    cache = latent_cache.build(sd, ds, 16, True, str(tmp_path / "c"), log=lambda *_: None, buckets=plan)
    assert cache["shapes"].tolist() == [[6, 10, 8]] * 2 + [[10, 6, 8]] * 2 and "pooled" in cache
    kw = dict(batch_size=2, resolution=16, seed=1, random_flip=True, num_workers=0, buckets=plan)
    with batches(ds, **kw) as images, latent_cache.cached_batches(cache, ds, **kw) as cached:
        for _ in range(4):
            a, b = next(images), next(cached)
            np.testing.assert_array_equal(a["indices"], b["indices"])
            np.testing.assert_array_equal(a["crop_top_left"], b["crop_top_left"])
            assert rel_err(b["moments"], sd.encode_moments(sd.params, a["images"])) <= 1e-5


def test_run_compiles_one_step_per_bucket_sdxl_targets_and_resumes_exactly(tmp_path, capsys, monkeypatch):
    from ldm_jax.cli.main import main
    from ldm_jax.train import loop
    from tests.train_worker import COMMON

    data = _shaped_dataset(tmp_path / "d", [(40, 24)] * 4 + [(24, 40)] * 4)
    targets = []
    original = loop.size_conditioning

    def recording(rows, target):
        targets.append(tuple(int(v) for v in np.broadcast_to(target, 2)))
        return original(rows, target)

    monkeypatch.setattr(loop, "size_conditioning", recording)
    common = [a if a != "tiny" else "tiny-xl" for a in COMMON]
    args = ["train", *common, "--batch-size", "4", "--aspect-buckets", "--random-flip", "--precompute-latents",
            "--data", str(data.root), "--steps", "4"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    out = capsys.readouterr().out
    assert "12x20: 4, 20x12: 4" in out or "20x12: 4, 12x20: 4" in out
    assert sorted(line.split("bucket ")[1].split()[0] for line in out.splitlines()
                  if "compiling the train step for the bucket" in line) == ["12x20", "20x12"]
    assert set(targets) == {(12, 20), (20, 12)}  # SDXL's target size (height, width) is the bucket
    assert main([*args, "--out", str(tmp_path / "split"), "--stop-after", "2"]) == 0
    assert main([*args, "--out", str(tmp_path / "split"), "--resume"]) == 0
    unbucketed = [a for a in args if a != "--aspect-buckets"]
    assert main([*unbucketed, "--steps", "5", "--out", str(tmp_path / "split"), "--resume"]) == 2
    assert "started with --aspect-buckets" in capsys.readouterr().err

    def rows(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    straight, split = rows("straight"), rows("split")
    assert [r["loss"] for r in straight] == [r["loss"] for r in split] and len(split) == 4
    assert [r["position"] for r in split] == [4, 8, 12, 16]
