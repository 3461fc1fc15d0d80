"""The host's side of a training step that the GPU finishes quickly: the embedded model's U-Net, one GPU.

    python bench/train_host.py                 # batch 256, --compile graphs and full
    python bench/train_host.py --profile       # and where the host's time goes (cProfile, top functions)

The embedded model's U-Net (bench/train_step.py --part small: 10.5M parameters, 16x16 latents, batch 256) does
its GPU work in ~14 ms a step on an H200, so the host sets the pace. This times ldm's step (`train.loop.train_step`
over an in-memory latent cache, as `ldm train` runs it) as shipped and with two of its host-side levers taken back
in turn (`variant`): the clipping's list of trained parameters built by walking the modules each step, and then also
a `pin_memory()` copy per host->GPU tensor (torch's caching host allocator) instead of the reused pinned buffers of
`train.loss.PinnedStaging`; each variant `--repeats` times in turn in one process, beside the plain loop compiled
with CUDA graphs (torch.compile's reduce-overhead, written in bench/train_step.py). --profile adds the first and the
shipped variant's cProfile of the graphed step: the functions with the most cumulative time, in ms a step.
"""

import argparse
import cProfile
import pstats
import random
from contextlib import contextmanager

import torch
import train_step as ts
from common import Report, add_out_option, out_folder

VARIANTS = ("before", "ring", "shipped")  # what each run changes back, cumulatively


@contextmanager
def variant(name: str):
    """ldm's step as shipped ("shipped"), with the clipping's per-step walk of the modules for the trained
    parameters put back ("ring": the step before the optimizer's own lists were used), and with a
    `pin_memory()` per host->GPU copy as well ("before": the step before the reused pinned buffers)."""
    from ldm_cli.train import loop, loss

    shipped_staging, shipped_step = loss.STAGING, loop.train_step

    def walking(cfg, model, *rest):
        [p for p in model.parameters() if p.requires_grad]  # the list the clipping built each step
        return shipped_step(cfg, model, *rest)

    try:
        loss.STAGING = None if name == "before" else shipped_staging
        loop.train_step = shipped_step if name == "shipped" else walking  # bench/train_step imports it per step maker
        yield
    finally:
        loss.STAGING, loop.train_step = shipped_staging, shipped_step


def ab(batch: int, modes, steps: int, warmup: int, repeats: int):
    """ldm's step as each variant, `repeats` times over in turn (A/B/C/A/B/C: a drift in the machine shows as a
    spread)."""
    for mode in modes:
        for name in VARIANTS * repeats:
            with variant(name):
                yield ts.timed_run(f"ldm compile={mode} {name}", batch, ts.ldm_step(batch, mode), steps, warmup)


def host_profile(batch: int, mode: str, steps: int, top: int = 25):
    """The first and the shipped variant's cProfile of `steps` steps after 5 of warm-up: [function, cumulative ms
    a step, calls]."""
    for name in (VARIANTS[0], VARIANTS[-1]):
        with variant(name):
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
        yield {"run": f"host profile ldm compile={mode} {name}", "batch": batch, "steps": steps,
               "top_ms_per_step": [[f"{f.rsplit('/', 2)[-1]}:{line}({fn})", round(1000 * v[3] / steps, 2),
                                    v[0]] for (f, line, fn), v in rows]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256, help="images a step (the embedded recipe's)")
    ap.add_argument("--steps", type=int, default=100, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="steps before the timed span (compilation)")
    ap.add_argument("--modes", default="graphs,full", help="ldm train --compile modes to time, comma-separated")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each variant, in turn")
    ap.add_argument("--profile", action="store_true", help="also the graphed step's cProfile, first and shipped variant")
    add_out_option(ap)
    args = ap.parse_args()
    random.seed(0)
    ts.SHAPE = ts.small_shape()
    report = Report(out_folder(args.out), "train_host")
    for row in ab(args.batch, args.modes.split(","), args.steps, args.warmup, args.repeats):
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
