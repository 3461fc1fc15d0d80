"""Where SD-1.5's training FLOPs are, by kind of kernel, and how fast each kind ran in a profiled step.

    python bench/train_flops.py                                          # FLOPs by kind (CPU, seconds)
    python bench/train_flops.py --kernels bench/results/h100/train_tuning.jsonl --run "kernels ldm cl-gn"

The FLOPs are counted by torch's FlopCounterMode over one forward of the SD-1.5-shaped U-Net (bench/common.py)
built on the meta device, so no GPU and no weights are needed: convolution (3x3; the 1x1 ones run as matmuls
where inductor's `conv_1x1_as_mm` is on, ldm's `full` in channels_last), matmul (the linear layers and the 1x1
convolutions' forward) and attention (the products of softmax(QK^T)V). Training counts 3x the forward, the
convention of the MFU figures (bench/train_step.py).

With `--kernels`, a row of GPU time by kind of kernel (bench/train_step.py --part kernels, train_tuning.py
--kernels, written with `<kind>_ms` fields) gives each kind's achieved TFLOP/s: against the datasheet's 989
(MFU's denominator) and against `--ceiling`, what a large bf16 matmul reaches on that GPU on random data (~790 on
the H100s and H200s measured: the rate no kernel here can beat; `--measure-ceiling` times it on this GPU). The
last lines say what the step would take if attention ran at the convolutions' rate, and if every compute-bound
kind ran at the ceiling (the rest, memory-bound, as measured).
"""

import argparse
import json
import sys
from pathlib import Path

KINDS = ("convolution", "matmul", "attention")
DATASHEET_TFLOPS = 989.0


def forward_gflop(latent: int = 64) -> dict[str, float]:
    """One image's forward GFLOP by operation (the SD-1.5-shaped U-Net, 77 tokens of context): 3x3 and 1x1
    convolutions apart, matmuls (the linear layers), attention (the products of softmax(QK^T)V)."""
    import torch
    from common import sd15_unet
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = sd15_unet()
    pointwise_convs = []  # 1x1 convolutions' FLOPs: 2 x output elements x input channels

    def count_1x1(module, inputs, output):
        pointwise_convs.append(2 * output.numel() * module.in_channels)

    for m in unet.modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1):
            m.register_forward_hook(count_1x1)
    x = torch.zeros(1, 4, latent, latent, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, torch.tensor([500], device="meta"), encoder_hidden_states=torch.zeros(1, 77, 768, device="meta"))
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    gflop = {"conv3x3": by_op.pop("aten.convolution", 0) - sum(pointwise_convs), "conv1x1": sum(pointwise_convs),
             "matmul": by_op.pop("aten.addmm", 0) + by_op.pop("aten.mm", 0),
             "attention": sum(by_op.pop(k) for k in list(by_op) if "bmm" in k or "attention" in k)}
    if by_op:
        raise SystemExit(f"FLOPs of an operation this script does not sort: {sorted(by_op)}")
    return {k: v / 1e9 for k, v in gflop.items()}


def training_gflop_by_kind(fwd: dict[str, float], conv_1x1_as_mm: bool) -> dict[str, float]:
    """One image's training GFLOP by kind of kernel: 3x the forward (MFU's convention). Inductor's
    `conv_1x1_as_mm` rewrites the forward's 1x1 convolutions only; their two backward products stay
    convolutions (aten.convolution_backward, cuDNN's dgrad and wgrad)."""
    moved = fwd["conv1x1"] if conv_1x1_as_mm else 0.0
    return {"convolution": 3 * (fwd["conv3x3"] + fwd["conv1x1"]) - moved,
            "matmul": 3 * fwd["matmul"] + moved, "attention": 3 * fwd["attention"]}


def measured_ceiling(n: int = 8192, reps: int = 10) -> float:
    """TFLOP/s of an n x n x n bf16 matmul on random data on this GPU (the mean of `reps` after 3 warm-ups)."""
    import torch

    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    end.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


def kernel_row(path: Path, run: str) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    found = [r for r in rows if r.get("run") == run and "convolution_ms" in r]
    if not found:
        names = sorted({r["run"] for r in rows if "convolution_ms" in r})
        raise SystemExit(f"{path}: no kernel row named {run!r}; those there: {', '.join(names) or 'none'}")
    return found[-1]


def rates(gflop: dict[str, float], row: dict, ceiling: float) -> list[dict]:
    batch = row["batch"]
    out = []
    for kind in KINDS:
        tflop = batch * gflop[kind] / 1e3
        ms = row[f"{kind}_ms"]
        out.append({"kind": kind, "tflop_a_step": round(tflop, 2), "ms": ms, "tflops": round(tflop / ms * 1e3),
                    "of_datasheet_pct": round(100 * tflop / ms * 1e3 / DATASHEET_TFLOPS, 1),
                    "of_ceiling_pct": round(100 * tflop / ms * 1e3 / ceiling, 1)})
    return out


def what_ifs(per_kind: list[dict], row: dict, ceiling: float) -> dict:
    """The step's wall time if attention ran at the convolutions' achieved rate, and if all three compute-bound
    kinds ran at the ceiling; everything else (pointwise, norms, optimizer, idle) kept as measured."""
    by = {r["kind"]: r for r in per_kind}
    wall = row["wall_ms"]
    attention_at_conv = by["attention"]["tflop_a_step"] / by["convolution"]["tflops"] * 1e3
    at_ceiling = sum(r["tflop_a_step"] for r in per_kind) / ceiling * 1e3
    return {"wall_ms": wall,
            "attention_at_conv_rate_ms": round(wall - by["attention"]["ms"] + attention_at_conv, 1),
            "compute_at_ceiling_ms": round(wall - sum(r["ms"] for r in per_kind) + at_ceiling, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", type=Path, help="a .jsonl with kernel-time rows (`<kind>_ms` fields)")
    ap.add_argument("--run", default="kernels ldm cl-gn", help="the row's `run` name in --kernels")
    ap.add_argument("--ceiling", type=float, default=790.0, help="TFLOP/s of a large bf16 matmul on that GPU")
    ap.add_argument("--measure-ceiling", action="store_true", help="time that matmul on this GPU instead")
    ap.add_argument("--nchw", action="store_true", help="count 1x1 convolutions as convolutions (NCHW, no as_mm)")
    args = ap.parse_args()
    fwd = forward_gflop()
    total = sum(fwd.values())
    print("forward GFLOP an image: " + ", ".join(f"{k} {v:.1f} ({100 * v / total:.1f}%)" for k, v in fwd.items())
          + f"; total {total:.1f}")
    gflop = training_gflop_by_kind(fwd, conv_1x1_as_mm=not args.nchw)
    print("training GFLOP an image by kernel kind: " + ", ".join(f"{k} {v:.1f}" for k, v in gflop.items())
          + f"; total {sum(gflop.values()) / 1e3:.2f} TFLOP")
    if args.kernels is None:
        return
    row = kernel_row(args.kernels, args.run)
    if args.measure_ceiling:
        args.ceiling = measured_ceiling()
        print(f"ceiling measured here: {args.ceiling:.0f} TFLOP/s (bf16 8192^3 matmul, random data)")
    per_kind = rates(gflop, row, args.ceiling)
    print(f"\n{args.kernels} `{args.run}` (batch {row['batch']}; ceiling {args.ceiling:.0f} TFLOP/s)\n")
    print("| kind | TFLOP a step | kernel ms | TFLOP/s | of 989 | of the ceiling |\n|---|---|---|---|---|---|")
    for r in per_kind:
        print(f"| {r['kind']} | {r['tflop_a_step']} | {r['ms']} | {r['tflops']} | {r['of_datasheet_pct']}% | "
              f"{r['of_ceiling_pct']}% |")
    w = what_ifs(per_kind, row, args.ceiling)
    print(f"\nstep {w['wall_ms']} ms as profiled; attention at the convolutions' rate: {w['attention_at_conv_rate_ms']}"
          f" ms; all three kinds at the ceiling: {w['compute_at_ceiling_ms']} ms")
    json.dump({"row": args.run, "gflop_forward": fwd, "gflop_training": gflop, "kinds": per_kind, **w}, sys.stdout)
    print()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
