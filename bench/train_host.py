"""The host's side of a training step that the GPU finishes quickly: the embedded model's U-Net, one GPU.

    python bench/train_host.py                 # batch 256, --compile graphs and full
    python bench/train_host.py --profile       # and where the host's time goes (cProfile, top functions)

The embedded model's U-Net (bench/train_step.py --part small: 10.5M parameters, 16x16 latents, batch 256) does
its GPU work in ~14 ms a step on an H200, so the host sets the pace. This times ldm's step (`train.loop.train_step`
over an in-memory latent cache, as `ldm train` runs it) with its host->GPU copies staged through reused pinned
buffers (`train.loss.PinnedStaging`, as shipped) and through a `pin_memory()` copy per tensor (torch's caching
host allocator, what ldm did before), alternating A/B/A/B in one process, beside the plain loop compiled with
CUDA graphs (torch.compile's reduce-overhead, written in bench/train_step.py). --profile adds each staging's
cProfile of the graphed step: the functions with the most cumulative time, in ms a step.
"""

import argparse
import cProfile
import pstats
import random

import torch
import train_step as ts
from common import Report, add_out_option, out_folder


def stagings():
    from ldm_cli.train import loss

    return (("pin_memory", None), ("ring", loss.STAGING))


def ab(batch: int, modes, steps: int, warmup: int):
    """ldm's step under each staging, twice over (A/B/A/B: a drift in the machine shows as a spread)."""
    from ldm_cli.train import loss

    shipped = loss.STAGING
    try:
        for mode in modes:
            for name, staging in stagings() * 2:
                loss.STAGING = staging
                yield ts.timed_run(f"ldm compile={mode} staging={name}", batch, ts.ldm_step(batch, mode), steps,
                                   warmup)
    finally:
        loss.STAGING = shipped


def host_profile(batch: int, mode: str, steps: int, top: int = 25):
    """Each staging's cProfile of `steps` steps after 5 of warm-up: [function, cumulative ms a step]."""
    from ldm_cli.train import loss

    shipped = loss.STAGING
    try:
        for name, staging in stagings():
            loss.STAGING = staging
            step = ts.ldm_step(batch, mode)
            for _ in range(5):
                step()
            torch.cuda.synchronize()
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(steps):
                loss_value = step()
            float(loss_value)
            profiler.disable()
            stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, _, tottime, cumtime, _)}
            rows = sorted(stats.items(), key=lambda kv: -kv[1][3])[:top]
            yield {"run": f"host profile ldm compile={mode} staging={name}", "batch": batch, "steps": steps,
                   "top_ms_per_step": [[f"{f.rsplit('/', 2)[-1]}:{line}({fn})", round(1000 * v[3] / steps, 2),
                                        v[0]] for (f, line, fn), v in rows]}
    finally:
        loss.STAGING = shipped


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256, help="images a step (the embedded recipe's)")
    ap.add_argument("--steps", type=int, default=100, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="steps before the timed span (compilation)")
    ap.add_argument("--profile", action="store_true", help="also each staging's cProfile of the graphed step")
    add_out_option(ap)
    args = ap.parse_args()
    random.seed(0)
    ts.SHAPE = ts.small_shape()
    report = Report(out_folder(args.out), "train_host")
    for row in ab(args.batch, ("graphs", "full"), args.steps, args.warmup):
        report.emit(row)
    report.emit(ts.plain_run(args.batch, True, args.steps, args.warmup, mode="reduce-overhead"))
    if args.profile:
        for row in host_profile(args.batch, "graphs", 40):
            report.emit(row)
    report.table(("run", "batch", "images/s", "step ms", "first step s"),
                 lambda r: [r["run"], r["batch"], r["images_per_s"], r["step_ms"], r["first_s"]]
                 if "step_ms" in r else None)
    report.save()


if __name__ == "__main__":
    main()
