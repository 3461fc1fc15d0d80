"""SD-1.5's attention shapes, forward + backward, per SDPA backend and per head dim padded with zeros.

    python bench/attention_shapes.py                 # batch 32, the three self-attention levels of SD-1.5

Why: in SD-1.5's training step attention runs at ~28% of the GPU's matmul ceiling (bench/train_flops.py), the
convolutions at ~75%. Its 4096-token level has 8 heads of 40 (1024 tokens: 80; 256: 160). Padding a head's
queries, keys and values with zeros to 48 or 64 gives the same output (a zero adds nothing to q.k, a zero
column of v gives a zero column, sliced off; the softmax's scale kept 1/sqrt(40)) for up to 1.6x the FLOPs: a
lever only if a kernel runs the padded shape faster than the real one. Each row times one shape's forward and
backward (the gradients of q, k and v), CUDA events over `--reps` calls after 3, and states its TFLOP/s on the
real head dim's FLOPs (4 x tokens^2 x head dim x heads x batch forward, 2.5x that backward).
"""

import argparse
import math

import torch
import torch.nn.functional as F
from common import Report, add_out_option, out_folder
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
LEVELS = ((4096, 8, 40, (40, 48, 64)), (1024, 8, 80, (80, 96, 128)), (256, 8, 160, (160, 192)))


def fwd_bwd(batch: int, tokens: int, heads: int, dim: int, padded: int, backend: str, reps: int) -> float | None:
    """ms of one forward + backward at head dim `dim` padded to `padded`; None where the backend refuses it."""
    shape = (batch, heads, tokens, dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def call():
        pad = (0, padded - dim)
        qp, kp, vp = (F.pad(t, pad) for t in (q, k, v))
        with sdpa_kernel([BACKENDS[backend]]):
            out = F.scaled_dot_product_attention(qp, kp, vp, scale=1 / math.sqrt(dim))[..., :dim]
        out.backward(grad)

    try:
        for _ in range(3):
            call()
    except RuntimeError:
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def same_output(batch: int, tokens: int, heads: int, dim: int, padded: int) -> float:
    """Largest difference between the padded and the unpadded attention's output (bf16, the default backend)."""
    q, k, v = (torch.randn(batch, heads, tokens, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    pad = (0, padded - dim)
    out = F.scaled_dot_product_attention(*(F.pad(t, pad) for t in (q, k, v)), scale=1 / math.sqrt(dim))[..., :dim]
    return (out.float() - ref.float()).abs().max().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=10)
    add_out_option(ap)
    args = ap.parse_args()
    report = Report(out_folder(args.out), "attention_shapes")
    for tokens, heads, dim, pads in LEVELS:
        tflop = 3.5 * 4 * tokens**2 * dim * heads * args.batch / 1e12
        for padded in pads:
            for backend in BACKENDS:
                ms = fwd_bwd(args.batch, tokens, heads, dim, padded, backend, args.reps)
                report.emit({"tokens": tokens, "heads": heads, "head_dim": dim, "padded_to": padded,
                             "backend": backend, "ms": None if ms is None else round(ms, 3),
                             "tflops": None if ms is None else round(tflop / ms * 1e3)})
            if padded != dim:
                report.emit({"tokens": tokens, "head_dim": dim, "padded_to": padded,
                             "max_abs_diff": same_output(4, tokens, heads, dim, padded)})
    report.table(("tokens", "head dim", "padded to", "backend", "fwd+bwd ms", "TFLOP/s"),
                 lambda r: [r["tokens"], r["head_dim"], r["padded_to"], r["backend"], r["ms"], r["tflops"]]
                 if "backend" in r else None)
    report.save()


if __name__ == "__main__":
    main()
