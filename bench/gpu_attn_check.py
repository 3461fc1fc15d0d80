"""Which SDPA kernel SD-1.5's attentions really get on this GPU, for each q/k/v layout diffusers makes.

1. cuDNN alone on (16, 4096, 8x40) attention, q/k/v as diffusers lays them out: separate projections,
   or chunks of one fused QKV projection (a token stride of 3C), or those chunks made contiguous;
   prints the time or why cuDNN declined.
2. The U-Net at batch 16 (fused QKV or not), eager, with PyTorch's own choice of attention kernel and
   with flash forced: attention kernels by name and ms per call.
Prints JSON lines; writes $OUT/attn_check.jsonl.
"""

import contextlib
import json
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(__file__))
from gpu_b8_breakdown import cuda_ms, kind_of, profile_kinds  # noqa: E402
from gpu_sample import build  # noqa: E402

ROWS = []


def emit(row):
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def layouts(dev, b=16, n=4096, c=320, h=8):
    split = lambda t: t.unflatten(-1, (h, -1)).transpose(1, 2)  # noqa: E731  (B, H, L, D) as diffusers makes it
    sep = [torch.randn(b, n, c, device=dev, dtype=torch.float16) for _ in range(3)]
    fused = torch.randn(b, n, 3 * c, device=dev, dtype=torch.float16).chunk(3, dim=-1)
    yield "separate projections", [split(t) for t in sep]
    yield "fused QKV chunks", [split(t) for t in fused]
    yield "fused QKV chunks, contiguous", [split(t.contiguous()) for t in fused]
    yield "fused QKV chunks, (B,H,L,D) contiguous", [split(t).contiguous() for t in fused]


def main():
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    for name, (q, k, v) in layouts(dev):
        row = dict(layout=name, strides=q.stride())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    row["cudnn_ms"] = round(cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v)), 4)
            except RuntimeError as e:
                row["cudnn_error"] = str(e).splitlines()[0][:120]
                row["why"] = [str(w.message)[:160] for w in caught if "cudnn" in str(w.message).lower()][:3]
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            row["flash_ms"] = round(cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v)), 4)
        emit(row)
    x = torch.randn(16, 4, 64, 64, device=dev, dtype=torch.float16)
    t = torch.full((16,), 500, device=dev)
    ctx = torch.randn(16, 77, 768, device=dev, dtype=torch.float16)
    for fuse in (True, False):
        unet = build(dev, torch.float16)[0].to(memory_format=torch.channels_last)
        if fuse:
            unet.fuse_qkv_projections()
        for choice in ("default", "flash"):
            forced = sdpa_kernel(SDPBackend.FLASH_ATTENTION) if choice == "flash" else contextlib.nullcontext()
            with torch.no_grad(), forced:
                call = lambda: unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0]  # noqa: E731
                ms = cuda_ms(call, 10)
                kinds, top = profile_kinds(call, 2)
            emit(dict(fused_qkv=fuse, attention_choice=choice, mode="eager", unet_ms=round(ms, 2),
                      attention_ms=kinds.get("attention"),
                      attention_kernels=[k for k in top if kind_of(k[0]) == "attention"][:4]))
        torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "attn_check.jsonl"), "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in ROWS)


if __name__ == "__main__":
    main()
