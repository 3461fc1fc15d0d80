"""How long an SD-1.5 full fine-tune's checkpoint takes to write and to resume from, phase by phase, on this
machine's disk: the training loop stands still meanwhile, so a run checkpointing every N steps pays it N steps.

    python bench/checkpoint_speed.py                       # SD-1.5-shaped U-Net, AdamW moments: ~10 GB
    python bench/checkpoint_speed.py --width 0.25 --dir /tmp/ck    # a smaller U-Net, elsewhere
    python bench/checkpoint_speed.py --width 0.5 --background      # and the loop's hold: background vs synchronous

The real code path (`train/checkpoints.py`: save_checkpoint, then find_resume("latest") and load_checkpoint as
a resume runs them), timed through wrappers around its pieces: the weights' safetensors, the optimizer's
state.pt, the manifest's digests, the fsyncs before the rename; on resume the digests (each verification reads
every file) and the loads. The page cache is dropped between saving and resuming where this process may
(root: /proc/sys/vm/drop_caches), so the resume reads from the disk as a new process on a busy machine would;
else the row says it was warm.
"""

import argparse
import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from common import Report, add_out_option, out_folder, sd15_unet


@contextmanager
def timed(module, name: str, totals: dict, key: str):
    """Time every call of module.name into totals[key] for the block."""
    fn = getattr(module, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - t

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, fn)


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def state_of(unet) -> tuple[dict, dict]:
    """(named trainable tensors, an AdamW state dict with both moments filled) as `ldm train` saves them."""
    named = dict(unet.named_parameters())
    opt = torch.optim.AdamW(named.values(), lr=1e-5, foreach=False)
    for p in named.values():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)
    return named, {"optimizer": opt.state_dict(), "step": 1}


def background_rows(root: Path, trainable: dict, state: dict) -> list[dict]:
    """How long `ldm train`'s loop is held by a checkpoint saved as it saves them mid-run (checkpoints.Writer,
    background=True: copied to the host, written by a thread) against one written synchronously, same tensors."""
    from ldm_cli.train import checkpoints as ck

    rows = []
    for step, background in ((2, False), (3, True)):
        writer = ck.Writer()
        t0 = time.perf_counter()
        writer.save(root, step, trainable, None, state, {"train": {}}, keep=5, background=background)
        held = time.perf_counter() - t0
        writer.wait()
        rows.append({"run": f"save, {'background' if background else 'synchronous'}", "loop_held_s": round(held, 2),
                     "total": round(time.perf_counter() - t0, 2),
                     "in_background": background and ck.available_memory() > 0 and held < 0.5 * (time.perf_counter() - t0)})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=float, default=1.0, help="share of SD-1.5's channels (1: SD-1.5 itself)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/ldm-checkpoint-bench"), help="where to write (removed after)")
    ap.add_argument("--background", action="store_true", help="also: the loop's hold by a checkpoint written in the "
                    "background (as ldm train saves mid-run) against a synchronous one; needs ~2x the checkpoint in "
                    "free host memory, else it is written synchronously (the row says)")
    add_out_option(ap)
    args = ap.parse_args()
    from ldm_cli.io import files
    from ldm_cli.train import checkpoints as ck

    report = Report(out_folder(args.out), "checkpoint_speed")
    torch.manual_seed(0)
    named, state = state_of(sd15_unet(args.width))
    root = args.dir / "checkpoints"
    shutil.rmtree(args.dir, ignore_errors=True)
    save, load = {}, {}
    t0 = time.perf_counter()
    with (timed(ck, "save_file", save, "weights"), timed(ck, "save_torch", save, "state.pt"),
          timed(ck, "_digests", save, "digests"), timed(files, "_fsync", save, "fsync")):
        ck.save_checkpoint(root, 1, named, None, state, {"train": {}}, keep=1)
    save["total"] = time.perf_counter() - t0
    gib = sum(p.stat().st_size for p in (root / "step-0000001").iterdir()) / 2**30
    del named, state  # the resume loads its own copy (SD-1.5: ~10 GB)
    cold = drop_page_cache()
    t0 = time.perf_counter()
    with (timed(ck, "_digests", load, "digests"), timed(ck, "load_file", load, "weights"),
          timed(ck.torch, "load", load, "state.pt")):
        found = ck.find_resume(root, "latest")
        trainable, _, state = ck.load_checkpoint(found)
    load["total"] = time.perf_counter() - t0
    held = background_rows(root, trainable, state) if args.background else []
    del trainable, state
    disk = subprocess.run(["df", "--output=source", str(args.dir)], capture_output=True, text=True).stdout.split()[-1]
    shutil.rmtree(args.dir, ignore_errors=True)
    r = lambda d: {k: round(v, 2) for k, v in d.items()}  # noqa: E731
    report.emit({"run": "save", "width": args.width, "gib": round(gib, 2), "disk": disk, **r(save),
                 "gib_per_s": round(gib / save["total"], 2)})
    report.emit({"run": "resume (find latest + load)", "width": args.width, "gib": round(gib, 2),
                 "page_cache": "dropped" if cold else "warm (not root)", **r(load),
                 "gib_per_s": round(gib / load["total"], 2)})
    for row in held:
        report.emit({**row, "width": args.width, "gib": round(gib, 2)})
    report.table(("run", "GiB", "total s", "loop held s", "weights s", "state.pt s", "digests s", "fsync s"),
                 lambda x: [x["run"], x["gib"], x["total"], x.get("loop_held_s", ""), x.get("weights", ""),
                            x.get("state.pt", ""), x.get("digests", ""), x.get("fsync", "")] if "gib" in x else None)
    report.save()


if __name__ == "__main__":
    main()
