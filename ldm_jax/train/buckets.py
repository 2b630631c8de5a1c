"""Aspect-ratio buckets: training on images that are not square without cropping them square (`ldm-jax train
--aspect-buckets`).

The technique is NovelAI's aspect-ratio bucketing (2022), used by kohya-ss' sd-scripts (`--enable_bucket`) and by
SDXL's multi-aspect training (Podell et al. 2023, sec. 2.3): a fixed set of (width, height) sizes whose sides are
multiples of a step and whose area is at most the square training resolution's; each image goes to the bucket
nearest its aspect ratio, is resized to cover it and cropped to it (`example.read_example`), and every batch is drawn
from one bucket. The U-Net is fully convolutional, so one set of weights trains on every bucket; each bucket shape
compiles its own train step. SDXL's size conditioning then records the bucket as the target size.

Sizes (`bucket_sizes`): for each width w from resolution/2 to 2 x resolution in steps of `step`, the height
min(2 x resolution, floor(resolution^2 / w / step) x step), and the transposed pair (kohya's rule; at 512 its
default limits 256..1024 and step 64 are these). `step` is 64 (kohya's and SDXL's), or the model's own size step where
that is larger, or resolution / 8 for small test resolutions.

Assignment (`plan`): the bucket minimising |log(w / h) - log(bw / bh)| for the image's size after its EXIF orientation
(ties: the first in `sizes`, which are sorted by aspect ratio). An image whose header cannot be read goes to the
square bucket; it is replaced at load time by a readable image of the same bucket (`data.BatchIterator`).

Order (`epoch_order`): walk the epoch's permutation (the same `default_rng([seed, epoch])` as square training) and
give each image to its bucket's pending list; whenever a list holds `chunk` images (the global batch x the grad-accum
micro-batches of one optimiser step) they become the next `chunk` entries of the epoch's order; leftovers are dropped
for that epoch (a new permutation next epoch drops others). So every step's micro-batches share one bucket, the order
depends only on (seed, epoch, buckets), and the epoch's length, sum over buckets of floor(count / chunk) x chunk, is
the same in every epoch, which keeps positions (resume tokens) as plain sample counts.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from ldm_jax.errors import UserError

BUCKET_STEP = 64
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees


def bucket_step(resolution: int, size_multiple: int) -> int:
    """The side step of the buckets: 64, or resolution / 8 if that is less (small test resolutions), rounded down to
    a multiple of the model's size multiple and never below it."""
    return max(size_multiple, min(BUCKET_STEP, resolution // 8) // size_multiple * size_multiple)


def bucket_sizes(resolution: int, step: int) -> tuple[tuple[int, int], ...]:
    """(width, height) of every bucket, sorted by aspect ratio w / h; includes (resolution, resolution) when
    `resolution` is a multiple of `step`."""
    if step < 1 or resolution < step:
        raise ValueError(f"need 1 <= step <= resolution, got step {step}, resolution {resolution}")
    lo, hi, area = max(step, resolution // 2 // step * step), 2 * resolution, resolution * resolution
    sizes = set()
    for w in range(lo, hi + 1, step):
        h = min(hi, area // w // step * step)
        if h >= lo:
            sizes.update({(w, h), (h, w)})
    return tuple(sorted(sizes, key=lambda s: (s[0] / s[1], s[0])))


def image_size(path) -> tuple[int, int] | None:
    """(width, height) of an image as `example.read_example` will see it (EXIF orientation applied), from its header
    only (no pixels decoded); None if PIL cannot open it."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            exif = Image.Exif()
            if img.info.get("exif"):  # read at open from the header (JPEG, WebP; PNG's eXIf before the pixels)
                exif.load(img.info["exif"])  # (img.getexif() would decode a whole PNG)
            orientation = exif.get(0x0112)
    except Exception:  # noqa: BLE001 - PIL raises many types; the loader reports the file when it is drawn
        return None
    return (h, w) if orientation in _TRANSPOSING_ORIENTATIONS else (w, h)


def nearest_bucket(size: tuple[int, int], sizes) -> int:
    """Index of the bucket whose aspect ratio is nearest (in log space) to `size`'s = (width, height)."""
    target = math.log(size[0] / size[1])
    errors = [abs(target - math.log(w / h)) for w, h in sizes]
    return int(np.argmin(errors))


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    """The buckets of one data set: `sizes[b]` = (width, height) of bucket b, `of_image[i]` = bucket of image i."""

    sizes: tuple[tuple[int, int], ...]
    of_image: np.ndarray  # int64 [n]

    def members(self, bucket: int) -> np.ndarray:
        """Indices of the images of `bucket`, ascending."""
        return np.flatnonzero(self.of_image == bucket)

    def counts(self) -> np.ndarray:
        return np.bincount(self.of_image, minlength=len(self.sizes))

    def epoch_length(self, chunk: int) -> int:
        """Samples in each epoch's order (the leftovers of each bucket dropped)."""
        return int((self.counts() // chunk).sum() * chunk)

    def summary(self) -> str:
        """'W x H: count' of the buckets that hold images, most images first."""
        counts = self.counts()
        used = sorted(np.flatnonzero(counts), key=lambda b: (-counts[b], b))
        return ", ".join(f"{self.sizes[b][0]}x{self.sizes[b][1]}: {counts[b]}" for b in used)


def plan(paths, resolution: int, size_multiple: int) -> BucketPlan:
    """Assign every image (by its header) to a bucket of `bucket_sizes(resolution, bucket_step(...))`."""
    sizes = bucket_sizes(resolution, bucket_step(resolution, size_multiple))
    square = nearest_bucket((1, 1), sizes)
    of_image = np.array([square if (s := image_size(p)) is None or min(s) < 1 else nearest_bucket(s, sizes)
                         for p in paths], dtype=np.int64)
    return BucketPlan(sizes, of_image)


def check_batches(plan_: BucketPlan, chunk: int, what: str) -> None:
    """UserError when no bucket holds one step's images (`chunk` = global batch x grad-accum)."""
    if plan_.epoch_length(chunk) == 0:
        raise UserError(f"with --aspect-buckets every step's {chunk} images ({what}) come from one bucket, and no "
                        f"bucket holds {chunk} images (buckets: {plan_.summary()}); lower --batch-size or "
                        "--grad-accum, add images, or train without --aspect-buckets")


def epoch_order(of_image: np.ndarray, permutation: np.ndarray, chunk: int) -> np.ndarray:
    """int64 [epoch length]: the epoch's samples, `chunk` consecutive entries per bucket (module docstring)."""
    pending: dict[int, list[int]] = {}
    order: list[int] = []
    for index in permutation.tolist():
        group = pending.setdefault(int(of_image[index]), [])
        group.append(index)
        if len(group) == chunk:
            order.extend(group)
            group.clear()
    return np.array(order, dtype=np.int64)
