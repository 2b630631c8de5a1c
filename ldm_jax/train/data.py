"""Captioned-image folders for fine-tuning: scanning, decoding and deterministic, resumable, shardable batches.

Two folder layouts (`scan_dataset`):

- caption files: `name.png|jpg|jpeg|webp|bmp` with `name.txt` next to it, searched recursively (hidden files and
  folders are ignored), sorted by relative path;
- the Hugging Face `imagefolder` convention (https://huggingface.co/docs/datasets/image_dataset): a `metadata.jsonl`
  at the root with one `{"file_name": ..., "text": ...}` object per line (`caption` is accepted for `text`),
  `file_name` relative to the root; kept in file order. When present it wins over caption files. A `metadata.csv`
  (a header row with `file_name` and `text` or `caption` columns) is read the same way where there is no .jsonl.

Text files are UTF-8, with or without a byte-order mark.

Preprocessing (`train.example`) follows diffusers' `train_text_to_image(_flax).py`: shorter side resized to the
resolution, center or random crop, optional flip, `x / 127.5 - 1`; each row also records SDXL's size and crop numbers.

Order (`batches`): the global sample order is the concatenation of the permutations
`np.random.default_rng([seed, epoch]).permutation(n)` for epoch = epoch_start, epoch_start + 1, ...; `position`
counts samples consumed in that order, so a run resumes exactly by passing back `stats.position`. Crop offsets and
flips come from `np.random.default_rng([seed, epoch, index])`. A global batch is `batch_size * num_shards` consecutive
samples; host `shard_index` gets rows `shard_index * batch_size : (shard_index + 1) * batch_size`. An unreadable image
is replaced by a readable one drawn deterministically from `[seed, epoch, offset, attempt]`, so every host reaches the
same decision without communication and positions never depend on which files are broken. Decoding runs on a thread
pool but results are gathered in submission order, so nothing depends on thread timing.

With `shuffle_caption`, each row's caption is `shuffle_tags` of it: its comma-separated tags in the order of
`default_rng([seed, epoch, index, 1]).permutation`, the first `keep_tokens` tags in place (kohya's --shuffle_caption,
--keep_tokens), so the text encoder does not learn the tags' order.

With aspect-ratio buckets (`buckets=`, `train.buckets`), each epoch's order is `buckets.epoch_order` of the same
permutation instead: every `group` consecutive global batches come from one bucket, each image is cropped to its
bucket, and an unreadable image is replaced by one of the same bucket.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ldm_jax.errors import UserError
from ldm_jax.train import buckets as B
from ldm_jax.train.example import SmallImageWarning, UnreadableImage, read_example, upscale_warning

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
METADATA_CSV = "metadata.csv"
CAPTION_COLUMNS = ("text", "caption")
MAX_REPLACEMENT_TRIES = 64
_EMPTY_HINT = "pass allow_empty_captions (--allow-empty-captions) to train with empty captions"


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Image paths and their captions (same length, same order) found under `root`."""

    paths: tuple[str, ...]
    captions: tuple[str, ...]
    root: str

    def __post_init__(self):
        if len(self.paths) != len(self.captions):
            raise ValueError(f"{len(self.paths)} paths but {len(self.captions)} captions")

    def __len__(self) -> int:
        return len(self.paths)


def scan_dataset(root, *, allow_empty_captions: bool = False, caption: str | None = None) -> Dataset:
    """Find the captioned images under `root` (see the module docstring); raises UserError on bad input. `caption`:
    every image gets this one (DreamBooth's instance or class prompt; caption files are then not needed)."""
    root_path = Path(root)
    if not root_path.exists():
        raise UserError(f"data directory not found: {root}")
    if not root_path.is_dir():
        raise UserError(f"data path is not a directory: {root}")
    metadata, table = root_path / METADATA_FILE, root_path / METADATA_CSV
    if metadata.is_file():
        pairs = _read_metadata(metadata, root_path, allow_empty_captions)
    elif table.is_file():
        pairs = _read_metadata(table, root_path, allow_empty_captions)
    else:
        pairs = _read_caption_files(root_path, allow_empty_captions or caption is not None)
    if caption is not None:
        pairs = [(path, caption) for path, _ in pairs]
    if not pairs:
        raise UserError(f"empty data directory: no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}")
    paths, captions = zip(*pairs)
    return Dataset(paths=tuple(paths), captions=tuple(captions), root=str(root_path))


def _metadata_rows(metadata: Path):
    """(line number, row) of a metadata.jsonl (a JSON value per line) or metadata.csv (a dict per row)."""
    try:
        text = metadata.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not JSON
    except UnicodeDecodeError:
        raise UserError(f"{metadata}: not UTF-8 text") from None
    if metadata.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if "file_name" not in (reader.fieldnames or []):
            raise UserError(f'{metadata}: expected a header row with a "file_name" column (and "text" or "caption")')
        try:
            for row in reader:
                if any(v for v in row.values() if isinstance(v, str) and v.strip()):
                    yield reader.line_num, {k: v for k, v in row.items() if k is not None}
        except csv.Error as e:
            raise UserError(f"{metadata}:{reader.line_num}: malformed CSV ({e})") from None
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{metadata}:{lineno}: malformed JSON line ({e.msg})") from None


def shuffle_tags(caption: str, rng: np.random.Generator, keep: int = 0) -> str:
    """The caption's comma-separated tags (stripped, empty ones dropped) with all but the first `keep` shuffled,
    joined by ", "."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep], tags[keep:]
    return ", ".join(head + [tail[i] for i in rng.permutation(len(tail))])


def _read_metadata(metadata: Path, root: Path, allow_empty: bool) -> list[tuple[str, str]]:
    pairs = []
    for lineno, row in _metadata_rows(metadata):
        where = f"{metadata}:{lineno}"
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise UserError(f'{where}: expected a JSON object with a "file_name" string')
        caption = next((row[c] for c in CAPTION_COLUMNS if c in row), None)
        if caption is not None and not isinstance(caption, str):
            raise UserError(f'{where}: the caption of {row["file_name"]} is not a string')
        path = root / row["file_name"]
        if not path.is_file():
            raise UserError(f"{where}: image file not found: {path}")
        caption = (caption or "").strip()
        if not caption and not allow_empty:
            raise UserError(f'{where}: no caption ("text" or "caption") for {row["file_name"]}; {_EMPTY_HINT}')
        pairs.append((str(path), caption))
    return pairs


def image_files(root) -> list[Path]:
    """The image files under `root`, searched recursively (hidden files and folders skipped), by relative path."""
    root = Path(root)

    def visible_image(p: Path) -> bool:
        rel = p.relative_to(root)
        return p.suffix.lower() in IMAGE_EXTENSIONS and not any(s.startswith(".") for s in rel.parts) and p.is_file()

    return sorted((p for p in root.rglob("*") if visible_image(p)), key=lambda p: p.relative_to(root).as_posix())


def _read_caption_files(root: Path, allow_empty: bool) -> list[tuple[str, str]]:
    images = image_files(root)
    pairs, missing = [], []
    for image in images:
        caption_file = image.with_suffix(".txt")
        caption = ""
        if caption_file.is_file():
            try:
                caption = caption_file.read_text(encoding="utf-8-sig").strip()
            except UnicodeDecodeError:
                raise UserError(f"{caption_file}: not UTF-8 text") from None
        if not caption:
            missing.append(image)
        pairs.append((str(image), caption))
    if missing and not allow_empty:
        more = f" (and {len(missing) - 1} more images)" if len(missing) > 1 else ""
        nested = sorted(p for name in (METADATA_FILE, METADATA_CSV) for p in root.rglob(name) if p.is_file())
        hint = (f"; {nested[0]} is only read at the top of --data: pass --data {nested[0].parent}" if nested
                else f"; {_EMPTY_HINT}")
        raise UserError(f"missing or empty caption for {missing[0]}: expected {missing[0].with_suffix('.txt').name} "
                        f"next to it{more}{hint}")
    return pairs


@dataclasses.dataclass
class DataStats:
    """Progress and problems. `position`: samples consumed since the start of the global order (resume token)."""

    position: int = 0
    epoch: int = 0  # absolute epoch of the next sample
    batches: int = 0
    skipped: int = 0  # sample loads replaced because the image was unreadable
    upscaled: int = 0  # sample loads of images smaller than the resolution
    skipped_files: set = dataclasses.field(default_factory=set)
    upscaled_files: set = dataclasses.field(default_factory=set)

    def as_dict(self) -> dict[str, int]:
        return {"position": self.position, "epoch": self.epoch, "batches": self.batches, "skipped": self.skipped,
                "upscaled": self.upscaled, "skipped_files": len(self.skipped_files),
                "upscaled_files": len(self.upscaled_files)}


class _Deferred:
    """A future-like call for num_workers=0."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def result(self):
        return self.fn(*self.args)


class BatchIterator:
    """Infinite iterator of {"images": float32 [B, H, W, 3], "captions": list[str], "indices": int64 [B],
    "original_sizes": int32 [B, 2] (height, width before resizing), "crop_top_left": int32 [B, 2] (`Example`)}.

    Use `batches(...)` to build one. `stats` reflects the batches returned so far; one batch is prefetched.
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, resolution: int, seed: int, epoch_start: int = 0,
                 position: int = 0, random_flip: bool = False, center_crop: bool = True, drop_last: bool = True,
                 shard_index: int = 0, num_shards: int = 1, num_workers: int = 2, buckets: B.BucketPlan | None = None,
                 group: int = 1, shuffle_caption: bool = False, keep_tokens: int = 0):
        if batch_size < 1 or resolution < 1 or num_shards < 1 or not 0 <= shard_index < num_shards:
            raise ValueError("need batch_size >= 1, resolution >= 1 and 0 <= shard_index < num_shards")
        if seed < 0 or epoch_start < 0 or position < 0:
            raise ValueError("seed, epoch_start and position must be non-negative")
        self.dataset, self.batch_size, self.resolution, self.seed = dataset, batch_size, resolution, seed
        self.epoch_start, self.random_flip, self.center_crop = epoch_start, random_flip, center_crop
        self.drop_last, self.shard_index, self.global_batch = drop_last, shard_index, batch_size * num_shards
        n = len(dataset)
        if n == 0:
            raise UserError("empty dataset")
        if drop_last and self.global_batch > n:
            raise UserError(f"the dataset has {n} images, fewer than the global batch size {self.global_batch}; "
                            "lower the batch size (or pass drop_last=False)")
        self.buckets, self.epoch_length = buckets, n  # samples of each epoch's order
        if buckets is not None:
            if not drop_last or group < 1 or len(buckets.of_image) != n:
                raise ValueError("buckets need drop_last=True, group >= 1 and a plan of this dataset")
            B.check_batches(buckets, self.global_batch * group, f"global batch {self.global_batch} x {group}")
            self.epoch_length = buckets.epoch_length(self.global_batch * group)
            self._members = [buckets.members(b) for b in range(len(buckets.sizes))]
        self.group, self.shuffle_caption, self.keep_tokens = group, shuffle_caption, keep_tokens
        self.stats = DataStats(position=position, epoch=epoch_start + self._batch_start(position) // n)
        self._cursor = position  # next position to submit (runs one batch ahead of stats.position)
        self._perms: dict[int, np.ndarray] = {}
        self._bad: dict[int, str] = {}  # index -> reason; shared by threads, a file's fate never depends on timing
        self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="ldm-data") if num_workers > 0 else None
        self._pending = None

    def __iter__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._pending, self._cursor = None, None, self.stats.position  # later batches: no threads

    def _order(self, epoch: int) -> np.ndarray:
        """The epoch's samples in order: its permutation, or with buckets `buckets.epoch_order` of it."""
        if epoch not in self._perms:
            if len(self._perms) >= 4:
                self._perms.pop(min(self._perms))
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
            if self.buckets is not None:
                order = B.epoch_order(self.buckets.of_image, order, self.global_batch * self.group)
            self._perms[epoch] = order
        return self._perms[epoch]

    def _caption(self, epoch: int, index: int) -> str:
        """Image `index`'s caption in `epoch` (its tags shuffled with `shuffle_caption`)."""
        caption = self.dataset.captions[index]
        if not self.shuffle_caption:
            return caption
        return shuffle_tags(caption, np.random.default_rng([self.seed, epoch, index, 1]), self.keep_tokens)

    def _crop(self, index: int):
        """The crop of image `index`: the square side, or its bucket's (width, height)."""
        return self.resolution if self.buckets is None else self.buckets.sizes[self.buckets.of_image[index]]

    def _replacement(self, epoch: int, offset: int, attempt: int, index: int) -> int:
        """The image drawn in place of an unreadable one (of the same bucket), the same on every host."""
        rng = np.random.default_rng([self.seed, epoch, offset, attempt])
        if self.buckets is None:
            return int(rng.integers(len(self.dataset)))
        members = self._members[self.buckets.of_image[index]]
        return int(members[rng.integers(len(members))])

    def _batch_start(self, position: int) -> int:
        n = len(self.dataset)
        if self.drop_last and position % n + self.global_batch > self.epoch_length:  # drop the epoch's remainder
            position = (position // n + 1) * n
        return position

    def _load_row(self, epoch: int, offset: int, index: int) -> tuple[Any, ...]:
        n, failures = len(self.dataset), []
        for attempt in range(MAX_REPLACEMENT_TRIES + 1):
            if attempt:  # replacement for an unreadable image, same for every host and thread timing
                index = self._replacement(epoch, offset, attempt, index)
            if index in self._bad:
                failures.append((index, self._bad[index]))
                continue
            rng = np.random.default_rng([self.seed, epoch, index])
            try:
                ex = read_example(self.dataset.paths[index], self._crop(index), self.center_crop, self.random_flip,
                                  rng)
                return ex.pixels, index, ex.original_size, ex.crop_top_left, failures, self._caption(epoch, index)
            except UnreadableImage as e:
                self._bad[index] = str(e)
                failures.append((index, str(e)))
        raise UserError(f"no readable image found in {MAX_REPLACEMENT_TRIES} tries; {len(self._bad)} of {n} images "
                        f"are unreadable (last: {failures[-1][1]})")

    def _submit(self):
        start = self._batch_start(self._cursor)
        n, first = len(self.dataset), start + self.shard_index * self.batch_size
        jobs = []
        for position in range(first, first + self.batch_size):
            epoch = self.epoch_start + position // n
            args = (epoch, position % n, int(self._order(epoch)[position % n]))
            jobs.append(self._pool.submit(self._load_row, *args) if self._pool else _Deferred(self._load_row, *args))
        self._cursor = start + self.global_batch
        return jobs, self._cursor

    def __next__(self) -> dict[str, Any]:
        if self._pending is None:
            self._pending = self._submit()
        jobs, end = self._pending
        self._pending = self._submit()  # prefetch the next batch while this one is gathered
        rows = [job.result() for job in jobs]
        for _, index, (w, h), _, failures, _ in rows:
            for bad_index, reason in failures:
                self.stats.skipped += 1
                if self.dataset.paths[bad_index] not in self.stats.skipped_files:
                    self.stats.skipped_files.add(self.dataset.paths[bad_index])
                    warnings.warn(f"skipping unreadable image {reason}")
            path = self.dataset.paths[index]
            message = upscale_warning(path, (w, h), self._crop(index))
            if message:
                self.stats.upscaled += 1
                if path not in self.stats.upscaled_files:
                    self.stats.upscaled_files.add(path)
                    warnings.warn(message, SmallImageWarning)
        self.stats.position, self.stats.batches = end, self.stats.batches + 1
        self.stats.epoch = self.epoch_start + self._batch_start(end) // len(self.dataset)
        return {"images": np.stack([r[0] for r in rows]), "captions": [r[5] for r in rows],
                "indices": np.array([r[1] for r in rows], dtype=np.int64),
                "original_sizes": np.array([r[2][::-1] for r in rows], dtype=np.int32),  # (h, w)
                "crop_top_left": np.array([r[3] for r in rows], dtype=np.int32)}


def batches(dataset: Dataset, *, batch_size: int, resolution: int, seed: int, epoch_start: int = 0, position: int = 0,
            random_flip: bool = False, center_crop: bool = True, drop_last: bool = True, shard_index: int = 0,
            num_shards: int = 1, num_workers: int = 2, buckets: B.BucketPlan | None = None,
            group: int = 1, shuffle_caption: bool = False, keep_tokens: int = 0) -> BatchIterator:
    """Infinite, deterministic batches of this host's rows (see the module docstring and `BatchIterator`).

    `batch_size` is per host. drop_last=True: batches stay inside an epoch and each epoch's last
    `n % (batch_size * num_shards)` samples are skipped; False: the order runs on across epochs, every sample is used.
    Resume with the same arguments and `position=stats.position`. `buckets`: aspect-ratio buckets (`train.buckets`),
    `group` consecutive global batches per bucket (the grad-accum micro-batches of one step). `shuffle_caption`,
    `keep_tokens`: see the module docstring.
    """
    return BatchIterator(dataset, batch_size=batch_size, resolution=resolution, seed=seed, epoch_start=epoch_start,
                         position=position, random_flip=random_flip, center_crop=center_crop, drop_last=drop_last,
                         shard_index=shard_index, num_shards=num_shards, num_workers=num_workers, buckets=buckets,
                         group=group, shuffle_caption=shuffle_caption, keep_tokens=keep_tokens)
