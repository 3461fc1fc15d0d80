"""Where a compiled training step's start-up goes, cold and warm, each start a fresh process (as a user's
second `ldm train` is): inductor's cache empty, then filled, then the same with dynamo's own cache of its
traced frames (TORCH_CACHING_PRECOMPILE=1, experimental in torch), so that a warm start skips tracing.

    python bench/compile_start.py                        # on a GPU: SD-1.5's U-Net, batch 32, bf16
    python bench/compile_start.py --precompile off --cache /tmp/inductor   # two starts over a kept cache
    python bench/compile_start.py --device cpu --width 0.1 --batch 1 --latent 16   # SD-1.5's blocks, a tenth
        of the channels (~5 minutes on 2 cores; bench/results/cpu/compile_start.jsonl)
    python bench/compile_start.py --device cpu --width 0.1 --batch 1 --latent 16 --precompile off --layout cl-gn
        # what `full`'s layout (channels_last, per-channel GroupNorm) adds to tracing; --layout nchw beside it
    python bench/compile_start.py --device cpu --width 0.1 --batch 1 --latent 16 --precompile off --layout nested
        # nchw with each ResNet and transformer block a nested compile region (torch.compiler.nested_compile_region:
        # each distinct block traced and compiled once, then reused), against --layout nchw; add --backend
        # aot_eager to time dynamo and AOTAutograd without inductor's code generation

The U-Net is SD-1.5's layout (blocks, layers, attention) with --width of its channels: tracing and
lowering cost follows the number of operations, not their size, so a narrow U-Net shows the start-up's
host-side phases on any machine. Each row: seconds from the process's start to the end of its first
training step (forward, MSE loss, backward, AdamW; `unet.compile()` as `ldm train --compile full` does),
split into imports and model, dynamo (tracing frames into graphs), the backend (AOTAutograd and inductor,
or their cache; the first step's time less these two is running it); the second step's time for scale.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Report, add_out_option, out_folder, sd15_unet

T0 = time.perf_counter()  # the child's start, near enough (the interpreter's own start-up is ~50 ms)


def child(args) -> None:
    """One start: build, compile, two training steps; prints one JSON line."""
    import torch
    import torch._dynamo.utils as dynamo_utils
    import torch.nn.functional as F

    dev = torch.device(args.device)
    torch.manual_seed(0)
    unet = sd15_unet(args.width).to(dev).train()
    if dev.type == "cuda" and args.layout == "shipped":  # as `ldm train --compile full` lays it out and compiles it
        from ldm_cli.train import fast

        fast.speed_up(unet, "full", dev)
    else:
        if args.layout == "cl-gn":  # `full`'s layout: channels_last, GroupNorms from per-channel statistics
            from ldm_cli.accel.groupnorm import use_channel_stats

            unet.to(memory_format=torch.channels_last)
            use_channel_stats(unet)
        if args.layout == "nested":  # the repeated blocks as nested regions of the one compiled graph
            from diffusers.models.attention import BasicTransformerBlock
            from diffusers.models.resnet import ResnetBlock2D

            for block in (ResnetBlock2D, BasicTransformerBlock):  # SD-1.5 has over 8 distinct ResNet blocks
                block.forward = torch.compiler.nested_compile_region(block.forward, max_reuse_entries=64)
        unet.compile(backend=args.backend)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=dev.type == "cuda")
    n, side = args.batch, args.latent
    latents, noise = torch.randn(2, n, 4, side, side, device=dev)
    t = torch.randint(0, 1000, (n,), device=dev)
    ctx = torch.randn(n, 77, unet.config.cross_attention_dim, device=dev)
    t_model = time.perf_counter()
    times = []
    for _ in range(2):
        t_step = time.perf_counter()
        with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
            pred = unet(latents + noise, t, ctx).sample
        F.mse_loss(pred.float(), noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t_step)
    metrics = dynamo_utils.compilation_time_metrics
    dynamo_all = sum(metrics.get("_compile.compile_inner", []))  # dynamo's frames, its backend calls inside
    backend = sum(metrics.get("OutputGraph.call_user_compiler", [])) + sum(
        v for k, vs in metrics.items() if "bw_compiler" in k for v in vs)
    print(json.dumps({"model_s": round(t_model - T0, 2), "first_step_s": round(times[0], 2),
                      "dynamo_s": round(dynamo_all - sum(metrics.get("OutputGraph.call_user_compiler", [])), 2),
                      "backend_s": round(backend, 2), "second_step_s": round(times[1], 3),
                      "keys": sorted(metrics)}))


def start(args, cache: Path, precompile: bool) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TORCH_CACHING_PRECOMPILE": "1" if precompile else "0"}
    cmd = [sys.executable, __file__, "--child", "--device", args.device, "--width", str(args.width),
           "--batch", str(args.batch), "--latent", str(args.latent), "--layout", args.layout, "--backend", args.backend]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode != 0 or not lines:
        errors = [x for x in p.stderr.splitlines() if "Error: " in x] or p.stderr.strip().splitlines() or ["?"]
        return {"error": errors[-1].strip(), "wall_s": round(wall, 1)}  # the exception's line, not a log hint after it
    row = json.loads(lines[-1])
    row["command_to_first_step_s"] = round(row["model_s"] + row["first_step_s"], 1)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--width", type=float, default=1.0, help="share of SD-1.5's channels (1: SD-1.5 itself)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--latent", type=int, default=64, help="latent side (64: 512-px images)")
    ap.add_argument("--precompile", default="off,on", help="dynamo's cache: off, on or both (off,on)")
    ap.add_argument("--layout", default="shipped", choices=("shipped", "nchw", "cl-gn", "nested"),
                    help="shipped: as `ldm train --compile full` on CUDA (cl-gn), a plain compile (nchw) on the CPU; "
                    "cl-gn: channels_last with GroupNorms from per-channel statistics, on any device; nested: nchw with the "
                    "ResNet and transformer blocks nested compile regions")
    ap.add_argument("--backend", default="inductor", help="torch.compile's backend where the layout is not `shipped` "
                    "(aot_eager: dynamo and AOTAutograd alone)")
    ap.add_argument("--cache", type=Path, help="inductor's cache folder to use (kept; a filled one makes the first "
                    "start warm); default: a new empty one per --precompile setting")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    add_out_option(ap)
    args = ap.parse_args()
    if args.child:
        return child(args)
    report = Report(out_folder(args.out), "compile_start")
    for precompile in [{"off": False, "on": True}[x] for x in args.precompile.split(",")]:
        with tempfile.TemporaryDirectory() as d:
            cache = args.cache or Path(d)
            for state in ("cold" if args.cache is None else "first", "warm"):
                row = {"start": state, "layout": args.layout, "backend": args.backend, "dynamo cache": precompile,
                       "width": args.width, "batch": args.batch, **start(args, cache, precompile)}
                if state == "warm" or precompile:
                    row.pop("keys", None)  # the timers' names, once
                report.emit(row)
    report.table(["start", "dynamo cache", "to first step s", "imports+model s", "dynamo s", "backend s", "step 2 s"],
                 lambda r: None if "start" not in r else [
                     r["start"], r["dynamo cache"], r.get("command_to_first_step_s"), r.get("model_s"), r.get("dynamo_s"),
                     r.get("backend_s"), r.get("second_step_s", r.get("error"))])
    report.save()


if __name__ == "__main__":
    main()
