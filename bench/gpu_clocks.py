"""Does the GPU hold its clock under ldm's batch-16 U-Net load, or is the call power-bound?

Why: the compiled batch-16 U-Net call replayed as a CUDA graph takes ~2 ms longer than the sum of its
kernels as the profiler measures them over 3 calls (34.1 vs 32.1 ms, results/s9-3), while at batch 2
the difference is 0.2 ms for as many kernels. Launch gaps would not grow with the batch; a clock that
drops under sustained load (power or temperature) would.

On the GPU machine, one process: the U-Net compiled as `ldm --accel compile` builds it (projections
grouped, first self-attention shared), graphed; for U-Net batch 16 and 2: the profiler's kernel sum
after 5 s idle, then 8 s of back-to-back calls timed per second while nvidia-smi samples SM clock,
power and throttle reasons every 100 ms, then the kernel sum again (hot). Prints JSON lines and a
table; writes $OUT/clocks.jsonl and the raw samples to $OUT/nvidia-smi-<batch>.csv.

    python bench/gpu_clocks.py
"""

import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from gpu_b8_breakdown import cuda_ms, profile_kinds  # noqa: E402
from gpu_sample import build  # noqa: E402
from report import ROWS, emit, print_table, save_jsonl  # noqa: E402

from ldm_cli.accel import GraphedUNet, _tune_inductor, group_shared_input_projections  # noqa: E402

FIELDS = "clocks.sm,clocks.mem,power.draw,power.limit,temperature.gpu,clocks_event_reasons.active"


def sampler(path):
    """nvidia-smi writing one CSV line per 100 ms to `path` until terminated (older drivers name the
    last field clocks_throttle_reasons)."""
    fields = FIELDS
    if subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv"], capture_output=True).returncode:
        fields = FIELDS.replace("clocks_event_reasons", "clocks_throttle_reasons")
    f = open(path, "w")  # noqa: SIM115 (the file lives as long as the process writing it)
    return subprocess.Popen(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits", "-lms", "100"],
                            stdout=f, stderr=subprocess.STDOUT)


def summarize(path):
    rows = []
    for line in open(path):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 6 and parts[0].isdigit():
            rows.append(parts)
    if not rows:
        return dict(nvidia_smi=open(path).read()[:300])
    busy = rows[len(rows) // 4:]  # past the first quarter: the sustained part
    reasons = sorted({r[5] for r in busy})
    return dict(sm_mhz_median=statistics.median(float(r[0]) for r in busy), sm_mhz_min=min(float(r[0]) for r in busy),
                sm_mhz_first=float(rows[0][0]), mem_mhz=float(busy[0][1]),
                power_w_median=statistics.median(float(r[2]) for r in busy), power_limit_w=float(busy[0][3]),
                temp_c_max=max(float(r[4]) for r in busy), throttle_reasons=reasons, samples=len(rows))


def main():
    dev = torch.device("cuda")
    emit(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    _tune_inductor()
    unet, _, _ = build(dev, torch.float16)
    unet.fuse_qkv_projections()
    group_shared_input_projections(unet)
    unet.to(memory_format=torch.channels_last)
    runner = GraphedUNet(torch.compile(unet, fullgraph=True, dynamic=False))
    for batch in (16, 2):
        g = torch.Generator(dev).manual_seed(0)
        x = torch.randn(batch // 2, 4, 64, 64, device=dev, dtype=torch.float16, generator=g)
        t = torch.tensor(500, device=dev)
        ctx = torch.randn(batch, 77, 768, device=dev, dtype=torch.float16, generator=g)
        call = lambda: runner(x, t, ctx)  # noqa: E731
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        print(f"batch {batch}: first call {time.perf_counter() - t0:.1f} s", flush=True)
        time.sleep(5)
        cold_kinds, _, _, cold_kernels = profile_kinds(call)
        cold_ms = cuda_ms(call, 5)
        path = os.path.join(os.environ.get("OUT", "/tmp"), f"nvidia-smi-{batch}.csv")
        smi = sampler(path)
        per_second = []
        end = time.perf_counter() + 8
        while time.perf_counter() < end:
            calls, t1 = 0, time.perf_counter()
            while time.perf_counter() - t1 < 1:
                for _ in range(10):
                    call()
                torch.cuda.synchronize()
                calls += 10
            per_second.append(round((time.perf_counter() - t1) * 1000 / calls, 3))
        hot_kinds, _, _, hot_kernels = profile_kinds(call)
        smi.terminate()
        smi.wait()
        emit(dict(unet_batch=batch, ms_per_call_cold=round(cold_ms, 3), ms_per_call_by_second=per_second,
                  kernel_sum_cold_ms=round(sum(cold_kinds.values()), 3), kernel_sum_hot_ms=round(sum(hot_kinds.values()), 3),
                  kernels=(cold_kernels, hot_kernels), kinds_cold=cold_kinds, kinds_hot=hot_kinds, **summarize(path)))
    print_table(("U-Net batch", "ms cold (5 calls)", "ms per call, second 1 / last", "kernel sum cold / hot ms",
                 "SM MHz first / median / min", "power W median / limit", "max C", "throttle reasons"), ROWS,
                lambda r: [r["unet_batch"], r["ms_per_call_cold"],
                           f"{r['ms_per_call_by_second'][0]} / {r['ms_per_call_by_second'][-1]}",
                           f"{r['kernel_sum_cold_ms']} / {r['kernel_sum_hot_ms']}",
                           f"{r.get('sm_mhz_first')} / {r.get('sm_mhz_median')} / {r.get('sm_mhz_min')}",
                           f"{r.get('power_w_median')} / {r.get('power_limit_w')}", r.get("temp_c_max"),
                           r.get("throttle_reasons", r.get("nvidia_smi"))] if "unet_batch" in r else None)
    save_jsonl("clocks.jsonl", ROWS)


if __name__ == "__main__":
    main()
