"""The compiler's own tuning levers on SD-1.5's training step, one GPU, one process: ldm's step as shipped beside
the same step with inductor's autotuning, with CUDA graphs, and beside the plain loop at its default and its
tuned torch.compile setting.

    python bench/train_tuning.py                                   # batch 32: full, nchw, plain compiled
    python bench/train_tuning.py --runs nchw,autotune,plain-autotune   # the GEMM/convolution templates' autotuning
    python bench/train_tuning.py --runs nchw,cdt                   # coordinate-descent tuning of the fused kernels
    python bench/train_tuning.py --runs autotune --losses          # and its first 20 losses against eager's
    python bench/train_tuning.py --runs nchw,cl-gn,gn --losses     # GroupNorm from per-channel statistics

SD-1.5-shaped random U-Net, 512px (64x64 latents), bf16, timed as bench/train_step.py times it (images/s over
--steps steps after --warmup; `first_s`, the first step's time, holds the compile and any autotuning).
What each run is (RUNS):
- `full`: `ldm train --compile full` as shipped (torch.compile of the whole U-Net in channels_last, its GroupNorms
  from per-channel statistics: `cl-gn` below, measured +8.2% over `nchw` on an H100);
- `nchw`: `full` as it shipped before: NCHW, torch's GroupNorm, inductor's defaults;
- `graphs`: `--compile graphs` (the same, each step's forward and backward replayed as CUDA graphs);
- `autotune`: `nchw` with inductor's `max_autotune`: each matmul and convolution benchmarked against Triton
  templates at compile time and the fastest kept (cuBLAS/cuDNN among them, so never slower by design);
- `cdt`: `nchw` with inductor's `coordinate_descent_tuning`: the block sizes of its own fused kernels (GroupNorm,
  the pointwise work) tuned one by one;
- `max`: both (torch.compile's mode "max-autotune-no-cudagraphs");
- `cl-cdt`: `cdt` over the U-Net in channels_last with the layout's inductor options (accel/inductor.py), as
  `--part levers` of bench/train_step.py timed the layout: whether tuned NHWC GroupNorm kernels win the layout
  back its transposes (channels_last untuned: level, its GroupNorm 19 ms slower, the transposes 20 ms gone);
- `gn`, `cl-gn`: `nchw` with the U-Net's GroupNorms computed from per-channel statistics (accel/groupnorm.py), in
  NCHW and in channels_last with the layout's inductor options: whether inductor's NHWC GroupNorm, read a channel
  row at a time, stops costing channels_last the transposes it spares the convolutions;
- `pad`: `full` with every attention head's q, k and v padded with zeros to a multiple of 64 (40 -> 64: the same
  output, 1.6x the FLOPs at SD-1.5's 4096-token level): whether cuDNN runs a padded head faster than a head of 40;
- `plain`, `plain-autotune`: the reference loop of bench/train_step.py (autocast bf16, fused AdamW, no clipping)
  under `torch.compile(unet)` and `torch.compile(unet, mode="max-autotune-no-cudagraphs")`: the peer at its
  default and at its best setting.
A run cut short by a time limit (SIGTERM) still writes the rows it has.
"""

import argparse
import random
import signal
import sys
from contextlib import contextmanager, nullcontext

import train_step as ts
from common import Report, add_out_option, out_folder

INDUCTOR = {"autotune": {"max_autotune": True}, "cdt": {"coordinate_descent_tuning": True},
            "max": {"max_autotune": True, "coordinate_descent_tuning": True},
            "cl-cdt": {"coordinate_descent_tuning": True}}
CHANNELS_LAST = {"cl-cdt", "cl-gn"}
BY_CHANNEL = {"gn", "cl-gn"}
SHIPPED = {"full", "graphs", "pad"}
RUNS = ("full", "graphs", "nchw", "autotune", "cdt", "max", "cl-cdt", "gn", "cl-gn", "pad", "plain", "plain-autotune")


@contextmanager
def tuned(options: dict | None, channels_last: bool = False, by_channel: bool = False, as_shipped: bool = False):
    """ldm's `fast.speed_up` with its `full` compile in NCHW, inductor options added (None: inductor's defaults);
    channels_last: the U-Net in that layout, compiled with the layout's options (accel/inductor.py) as well;
    by_channel: its GroupNorms from per-channel statistics (accel/groupnorm.py). as_shipped: speed_up untouched."""
    import torch

    from ldm_cli.accel.groupnorm import use_channel_stats
    from ldm_cli.accel.inductor import compile_options
    from ldm_cli.train import fast

    shipped = fast.speed_up

    def speed_up(unet, mode, device, _=None):
        if mode == "none":  # the eager step losses are compared with stays eager
            return shipped(unet, mode, device, False)
        if channels_last:
            unet.to(memory_format=torch.channels_last)
        if by_channel:
            use_channel_stats(unet)
        unet.compile(options={**compile_options(), **(options or {})} if channels_last else options)

    try:
        fast.speed_up = shipped if as_shipped else speed_up
        yield
    finally:
        fast.speed_up = shipped


@contextmanager
def padded_heads(multiple: int = 64):
    """diffusers' attention with each head's q, k and v padded with zeros to a multiple of `multiple` (40 -> 64,
    80 -> 128, 160 -> 192) and the output sliced back: the same values (the scale kept 1/sqrt(real head dim)),
    more FLOPs, for a kernel that may run the padded shape faster (bench/attention_shapes.py)."""
    import math
    import types

    import torch.nn.functional as F
    from diffusers.models import attention_processor

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        dim = q.shape[-1]
        pad = (0, -dim % multiple)
        if not pad[1]:
            return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, **kw)
        q, k, v = (F.pad(t, pad) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal,
                                             scale=scale or 1 / math.sqrt(dim), **kw)
        return out[..., :dim]

    shim = types.ModuleType("functional_padded_heads")
    shim.__dict__.update(vars(F))
    shim.scaled_dot_product_attention = sdpa
    try:
        attention_processor.F = shim
        yield
    finally:
        attention_processor.F = F


def run(name: str, batch: int, steps: int, warmup: int, losses: bool = False, kernels: bool = False):
    """The run's timing row, then (`kernels`) its step's GPU time by kind of kernel, and (`losses`, ldm's runs but
    `nchw`, whose losses docs/performance.md gives) its first 20 losses against ldm's eager step's, same seed: a
    lever is kept only if they agree to bf16 noise."""
    from common import kernel_breakdown

    if name.startswith("plain"):
        mode = "max-autotune-no-cudagraphs" if name == "plain-autotune" else None
        step = ts.plain_step(batch, True, mode=mode)
        yield ts.timed_run("plain compiled" + (f" {mode}" if mode else ""), batch, step, steps, warmup)
        if kernels:
            yield {"run": f"kernels {name}", "batch": batch, **kernel_breakdown(step, calls=3)}
        return
    mode = "graphs" if name == "graphs" else "full"
    with (tuned(INDUCTOR.get(name), name in CHANNELS_LAST, name in BY_CHANNEL, as_shipped=name in SHIPPED),
          padded_heads() if name == "pad" else nullcontext()):
        step = ts.ldm_step(batch, mode)
        yield ts.timed_run(f"ldm {name}", batch, step, steps, warmup)
        if kernels:
            yield {"run": f"kernels ldm {name}", "batch": batch, **kernel_breakdown(step, calls=3)}
        del step
        if losses and name != "nchw":
            yield {**ts.losses_agree(batch, mode), "run": f"losses ldm {name} vs eager"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="full,nchw,plain", help=f"comma-separated, in order, of: {', '.join(RUNS)}")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=15, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=4, help="steps before the timed span (compilation)")
    ap.add_argument("--losses", action="store_true", help="each ldm run's (not `nchw`'s) first 20 losses against eager's")
    ap.add_argument("--kernels", action="store_true", help="each run's step: GPU time by kind of kernel (profiler)")
    add_out_option(ap)
    args = ap.parse_args()
    names = args.runs.split(",")
    if unknown := set(names) - set(RUNS):
        sys.exit(f"--runs: unknown {sorted(unknown)}; choose from {', '.join(RUNS)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))  # a time limit still saves what was measured
    random.seed(0)
    report = Report(out_folder(args.out), "train_tuning")
    try:
        for name in names:
            for row in run(name, args.batch, args.steps, args.warmup, args.losses, args.kernels):
                report.emit(row)
    finally:
        report.table(("run", "batch", "images/s", "MFU", "step ms", "first step s", "peak GiB"),
                     lambda r: [r["run"], r["batch"], r["images_per_s"], f"{r['mfu_pct']}%", r["step_ms"],
                                r["first_s"], r["peak_gib"]] if "mfu_pct" in r else None)
        report.save()


if __name__ == "__main__":
    main()
