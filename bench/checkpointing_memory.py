"""How much of the U-Net's activations each gradient checkpointing keeps, on any machine (a CPU too): the memory a
training forward leaves held for the backward, without checkpointing, with all of it recomputed
(`--gradient-checkpointing`) and selective (`--selective-checkpointing`, train/recompute.py).

    python bench/checkpointing_memory.py                          # SD-1.5-shaped, batch 1, 64x64 latents
    python bench/checkpointing_memory.py --width 0.5 --batch 2    # a narrower U-Net
    python bench/checkpointing_memory.py --compiled               # under torch.compile, as --compile full (selective:
                                                                  # the compiler's memory budget, train/recompute.py)
    python bench/checkpointing_memory.py --host                   # the host's time a step: a tenth of the width,
                                                                  # 8x8 latents, where the kernels take ~nothing

Each mode runs in a fresh process (bf16 autocast, as `ldm train --mixed-precision bf16`): two forward and
backward steps, the memory held after the second forward against before it (`held_mib`), and the most held
during that step, its backward included (`peak_mib`: the reruns and the new gradients). On CUDA that is the allocator's
count; on a CPU it is the process's resident memory, with glibc told to map and unmap every block over 16 KiB
(else freed tensors stay resident and the count reads 0). The loss and the gradients' sum of squares are
printed too: they must be the same in all three. On a GPU, `bench/train_step.py --part memory --checkpointing
selective` gives the step's peak and speed.
`--host` times what each mode costs the host (Python, torch's dispatch): a U-Net of SD-1.5's layout at a tenth of
its width over 8x8 latents, one process, the fastest of five steps, and the operations torch dispatched in one
(eager selective checkpointing runs each of them through a Python dispatch mode, in the forward and the rerun).
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time

from common import Report, add_out_option, out_folder, sd15_unet

MODES = ("none", "all", "selective")


def held(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Peak:
    """The most memory held while the with-block runs (the backward's reruns and new gradients included): on CUDA
    the allocator's peak; on a CPU the resident memory sampled every millisecond by a thread."""

    def __init__(self, device: str):
        self.device, self.most, self.done = device, 0, threading.Event()

    def __enter__(self):
        import torch

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            self.thread = threading.Thread(target=self.sample, daemon=True)
            self.thread.start()
        return self

    def sample(self) -> None:
        while not self.done.wait(0.001):
            self.most = max(self.most, held("cpu"))

    def __exit__(self, *exc):
        import torch

        if self.device == "cuda":
            self.most = torch.cuda.max_memory_allocated()
        else:
            self.done.set()
            self.thread.join()
            self.most = max(self.most, held("cpu"))


def one(mode: str, width: float, batch: int, device: str, compiled: bool) -> dict:
    import torch

    from ldm_cli.train import fast, recompute

    torch.manual_seed(0)
    unet = sd15_unet(width).to(device).train()
    recompute.enable(unet, mode == "all", mode == "selective", compiled)
    if compiled:  # as `ldm train --compile full` does: the first step compiles, the second is measured
        unet.compile()
    x = torch.randn(batch, 4, 64, 64, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device)
    # compiled steps run as ldm's loop runs them: under compile_limits, with selective's memory budget
    with fast.compile_limits(recompute.compiled_budget(mode == "selective")) if compiled else contextlib.nullcontext():
        for _ in range(2):
            unet.zero_grad(set_to_none=True)
            before, t0 = held(device), time.perf_counter()
            with Peak(device) as peak:
                with torch.autocast(device, torch.bfloat16):
                    y = unet(x, t, ctx).sample
                after, t1 = held(device), time.perf_counter()
                loss = y.float().square().mean()
                loss.backward()
                t2 = time.perf_counter()
                del y
    gradsq = sum(float(p.grad.float().square().sum()) for p in unet.parameters() if p.grad is not None)
    return {"run": f"checkpointing {mode}" + (", compiled" if compiled else ""), "width": width, "batch": batch,
            "latent": 64, "device": device,
            "held_mib": round((after - before) / 2**20), "peak_mib": round((peak.most - before) / 2**20),
            "forward_s": round(t1 - t0, 2),
            "backward_s": round(t2 - t1, 2), "loss": round(float(loss), 6), "gradsq": round(gradsq, 6)}


def host_time(mode: str) -> dict:
    """One mode's step where the kernels take ~nothing: the host's time a step and the operations dispatched."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from ldm_cli.train import recompute

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    unet = sd15_unet(0.1).train()
    recompute.enable(unet, mode == "all", mode == "selective")
    x, t = torch.randn(1, 4, 8, 8), torch.randint(0, 1000, (1,))
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim)

    def step():
        with torch.autocast("cpu", torch.bfloat16):
            y = unet(x, t, ctx).sample
        y.float().square().mean().backward()

    step()
    with Count():
        step()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"run": f"host time, checkpointing {mode}", "width": 0.1, "batch": 1, "latent": 8, "device": "cpu",
            "threads": torch.get_num_threads(), "step_ms": round(1000 * min(times), 1), "ops": Count.ops}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=float, default=1.0, help="share of SD-1.5's channels")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cuda" if "--device" not in sys.argv and _has_cuda() else "cpu")
    ap.add_argument("--compiled", action="store_true", help="torch.compile the U-Net (ldm's --compile full)")
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one mode, in its own process
    ap.add_argument("--host", action="store_true", help="the host's time a step in each mode (see above)")
    add_out_option(ap)
    args = ap.parse_args()
    if args.host:
        report = Report(out_folder(args.out), "checkpointing_memory")
        for mode in MODES:
            report.emit(host_time(mode))
        report.save()
        return
    if args.mode:
        print(json.dumps(one(args.mode, args.width, args.batch, args.device, args.compiled)))
        return
    report = Report(out_folder(args.out), "checkpointing_memory")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "16384", "MALLOC_TRIM_THRESHOLD_": "0"}
    for mode in MODES:
        command = [sys.executable, __file__, "--mode", mode, "--width", str(args.width), "--batch", str(args.batch),
                   "--device", args.device] + ["--compiled"] * args.compiled
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{mode}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
        report.emit(json.loads(done.stdout.strip().splitlines()[-1]))
    keys = ("run", "held_mib", "peak_mib", "forward_s", "backward_s", "loss", "gradsq")
    report.table(keys, lambda r: [r[k] for k in keys] if "held_mib" in r else None)
    report.save()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
