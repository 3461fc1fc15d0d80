"""Aspect-ratio buckets: train each image at about resolution^2 pixels in the shape nearest its own, instead
of a centre square that cuts a third off a 16:9 photo.

The bucket sizes are kohya's (sd-scripts `make_bucket_resolutions`): for each width w from min_side to max_side
in steps of `step`, the tallest height h (a multiple of `step`, at most max_side) with w * h <= resolution^2,
both orientations, and the square. An image goes to the bucket nearest its aspect ratio in log space (so 4:3 and
3:4 are treated alike), is resized to cover it and centre-cropped by what is left over: at most half the gap in
aspect ratio to the next bucket (the rounding). An image beyond the widest or tallest bucket by more than that
rounding has no bucket: cropping it would cut more than bucketing promises.

Batches: every batch is drawn from one bucket. Epoch e shuffles each bucket's images and the list of batches
with a generator seeded by (seed, e), so a step's batch depends only on (seed, step), as without buckets.
A bucket's last batch is filled up from the start of its own shuffled list, so every step has batch_size images.
"""

import functools
import math
import random
from dataclasses import dataclass

from ldm_cli.errors import check


@dataclass(frozen=True)
class BucketSpec:
    resolution: int
    min_side: int
    max_side: int
    step: int


def default_spec(resolution: int, min_side: int | None, max_side: int | None, step: int | None) -> BucketSpec:
    """kohya's defaults at 512 px (256, 1024, 64), scaled: half and twice the resolution, steps of 64 from
    512 px up, finer below (resolution / 8, at least the VAE's 8) so a 64 px model has more than one bucket."""
    step = step or (64 if resolution >= 512 else max(8, resolution // 64 * 8))
    return BucketSpec(resolution, min_side or resolution // 2, max_side or resolution * 2, step)


def check_spec(s: BucketSpec) -> None:
    flags = "--min-bucket-reso / --max-bucket-reso / --bucket-reso-steps"
    check(s.step % 8 == 0, f"--bucket-reso-steps must be a multiple of 8 (the VAE's factor), got {s.step}")
    check(s.min_side % s.step == 0 and s.max_side % s.step == 0,
          f"{flags}: {s.min_side} and {s.max_side} must be multiples of the step {s.step}")
    check(s.min_side <= s.resolution <= s.max_side, f"{flags}: the sides {s.min_side}..{s.max_side} must include "
          f"--resolution {s.resolution}")


def bucket_sizes(s: BucketSpec) -> list[tuple[int, int]]:
    """(width, height) of every bucket, sorted."""
    area = s.resolution * s.resolution
    side = s.resolution // s.step * s.step
    out = {(side, side)}
    for w in range(s.min_side, s.max_side + 1, s.step):
        h = min(s.max_side, area // w // s.step * s.step)
        if h >= s.min_side:
            out |= {(w, h), (h, w)}
    return sorted(out)


def _log_ratio(size: tuple[int, int]) -> float:
    return math.log(size[0] / size[1])


def rounding(sizes: list[tuple[int, int]], bucket: tuple[int, int]) -> float:
    """The most an image in `bucket` may differ from it in log aspect ratio: half the gap to its nearest
    neighbour on either side (for the widest and tallest, the gap on their one side)."""
    ratios = sorted({_log_ratio(b) for b in sizes})
    r = _log_ratio(bucket)
    i = ratios.index(r)
    gaps = [ratios[j + 1] - ratios[j] for j in (i - 1, i) if 0 <= j < len(ratios) - 1]
    return max(gaps, default=0.0) / 2


def assign(size: tuple[int, int], sizes: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The bucket of an image of `size` (width, height): the nearest in log aspect ratio, or None when even
    that one would crop more than the rounding (an image wider or taller than every bucket)."""
    r = _log_ratio(size)
    best = min(sizes, key=lambda b: (abs(_log_ratio(b) - r), b))
    return best if abs(_log_ratio(best) - r) <= rounding(sizes, best) + 1e-9 else None


def cover_crop(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int, int, int]:
    """(resized width, resized height, left, top): the image scaled to cover the bucket, centre crop."""
    w0, h0 = size
    bw, bh = bucket
    scale = max(bw / w0, bh / h0)
    w, h = max(bw, round(w0 * scale)), max(bh, round(h0 * scale))
    return w, h, (w - bw) // 2, (h - bh) // 2


def histogram(buckets: list[tuple[int, int]]) -> str:
    counts: dict[tuple[int, int], int] = {}
    for b in buckets:
        counts[b] = counts.get(b, 0) + 1
    return ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(counts.items()))


@functools.lru_cache(maxsize=4)
def epoch_plan(groups: tuple[tuple[int, ...], ...], batch: int, seed: int, epoch: int) -> tuple[tuple[int, ...], ...]:
    """Epoch `epoch`'s batches of example indices: each bucket's examples (`groups`) shuffled and cut into
    batches of `batch` (the last filled up from the bucket's start), then the batches shuffled."""
    rng = random.Random(seed * 1_000_003 + epoch)
    out = []
    for group in groups:
        order = list(group)
        rng.shuffle(order)
        for k in range(0, len(order), batch):
            chunk = order[k:k + batch]
            out.append(tuple(chunk + [order[j % len(order)] for j in range(batch - len(chunk))]))
    rng.shuffle(out)
    return tuple(out)
