"""How long the latent cache takes to build on this host, its encoders left out: the host's share (hash, decode,
write) of `ldm train`'s first pass over a folder, with the threads used as `ldm` does (large images in all the
pool's threads, small ones in one) beside all small images in one thread and in all threads.

    python bench/cache_build.py FOLDER [--resolution 64] [--limit 4000]

The encoders are stand-ins that return zeros of the real shapes (4 latent channels' mean and log-variance at
1/8 of the resolution, 32 tokens x 256 for the captions), so the figure is what the host adds to the GPU's
encoding. Each way writes a fresh cache in a temporary folder; the file cache is warmed by a first pass; the ways
alternate over --rounds rounds (disk write-back varies from pass to pass), medians and ranges reported.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

from common import Report, add_out_option, out_folder  # noqa: E402

from ldm_cli.train import cache  # noqa: E402
from ldm_cli.train.data import find_examples  # noqa: E402

WAYS = {"ldm (large images threaded)": cache.THREADED_FROM_PIXELS, "all in one thread": 10 ** 12,
        "all threaded": 0}


def build(examples, resolution: int) -> tuple[float, int]:
    lat = resolution // 8
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        r = cache.encode_dataset(examples, Path(d), resolution, lambda x: torch.zeros(x.shape[0], 8, lat, lat),
                                 lambda c: torch.zeros(len(c), 32, 256), batch_size=256)
        return time.perf_counter() - t, r.encoded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="an `ldm train` data folder (images + captions)")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--limit", type=int, default=4000, help="first N images of the folder")
    ap.add_argument("--rounds", type=int, default=3)
    add_out_option(ap)
    args = ap.parse_args()
    examples = find_examples(args.folder)[0][:args.limit]
    report = Report(out_folder(args.out), "cache_build")
    build(examples, args.resolution)  # warm the file cache
    times: dict = {name: [] for name in WAYS}
    entries = 0
    for _ in range(args.rounds):
        for name, threshold in WAYS.items():
            cache.THREADED_FROM_PIXELS = threshold
            seconds, entries = build(examples, args.resolution)
            times[name].append(seconds)
    for name, ts in times.items():
        report.emit({"way": name, "images": len(examples), "entries": entries, "resolution": args.resolution,
                     "seconds": round(statistics.median(ts), 2), "range": [round(min(ts), 2), round(max(ts), 2)],
                     "ms_per_entry": round(1000 * statistics.median(ts) / entries, 3)})
    report.table(["way", "images", "entries", "seconds (median)", "range", "ms an entry"],
                 lambda r: (r["way"], r["images"], r["entries"], r["seconds"], r["range"], r["ms_per_entry"])
                 if "way" in r else None)
    report.save()


if __name__ == "__main__":
    main()
