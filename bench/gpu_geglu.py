"""The feed-forward's GEGLU as one fused kernel: an experiment, not in ldm (session 9).

GEGLU (Shazeer 2020, "GLU Variants Improve Transformer", eq. 5 with GELU): for a linear layer whose
2N outputs are a value half and a gate half, h = (x W_v + b_v) * gelu(x W_g + b_g). diffusers runs it
as one 2N-wide matmul, then a second kernel that splits, applies GELU and multiplies: the 2N-wide
product goes to memory and back. In SD-1.5's U-Net at 512 px and batch 16 (batch 8 with guidance)
that second kernel reads 335 MB and writes 168 MB per top-level block, 0.17 ms on an H100.
`geglu_kernel` (Triton, persistent, TMA loads, warp-specialized) computes, for one tile of h, the
matching tiles of both halves and applies the gate in registers, so only h is written; `ldm::geglu`
is a custom op (opaque to torch.compile, captured in CUDA graphs); `use_fused_geglu` swaps diffusers'
GEGLU modules for it where `block_config` says it is the faster.

Measured (bench/RESULTS.md, session 9): alone, up to 1.15x at batch 16 and 1.28x at batch 2 on the
320-wide blocks (a first, non-persistent pointer version lost almost everywhere); inside the compiled
U-Net, 0.8% slower at batch 16 and 0.6% at batch 2 (its kernels ran ~15% slower there than alone).
Not adopted.

For each SD-1.5 feed-forward shape (width C, 4C-wide GEGLU, tokens per latent 4096/1024/256/64) at a
U-Net batch of 16 and 2, one process on the GPU machine, times:
- `matmul only`: F.linear alone (cuBLAS), the floor of the unfused path;
- `unfused, compiled`: diffusers' GEGLU module under torch.compile with ldm's inductor settings, as the
  compiled U-Net runs it (cuBLAS matmul + one Triton kernel for split, GELU and multiply);
- `fused`: geglu_kernel, every block configuration in CONFIGS (the best of them, and what
  `block_config` picks); $OUT/geglu_best.json keeps the best per shape where it beats the unfused path.
Each call is timed inside a CUDA graph of 20 calls (no launch gaps), best of 5 rounds. Max abs error vs
an fp32 reference for both paths. Prints JSON lines and a table; writes $OUT/geglu.jsonl.

    python bench/gpu_geglu.py
"""

import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from report import ROWS, emit, print_table, save_jsonl  # noqa: E402

from ldm_cli.accel import _tune_inductor  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU machines: the op falls back to PyTorch ops (and this file only imports)
    triton = None


def geglu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """diffusers' GEGLU.forward: value * gelu(gate), both halves of one linear layer's output."""
    value, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return value * F.gelu(gate)


if triton is not None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    @triton.jit
    def geglu_kernel(x_desc, wv_desc, wg_desc, out_desc, b_ptr, M, N, K, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     NUM_SMS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
        """out[M, N] = (x W_v^T + b[:N]) * gelu(x W_g^T + b[N:]) for x [M, K], W_v and W_g [N, K].

        Persistent: NUM_SMS programs walk the output tiles, GROUP_M rows of tiles at a time (so those
        rows of x and the weight tiles they use stay in L2 together). The tile and K loops are one
        flattened loop, so the next tile's loads (TMA) overlap this tile's GELU."""
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        per_group = GROUP_M * tiles_n
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_SMS, flatten=True,
                             warp_specialize=WARP_SPECIALIZE):
            first_m = (tile // per_group) * GROUP_M
            group_m = min(tiles_m - first_m, GROUP_M)
            off_m = (first_m + (tile % per_group) % group_m) * BLOCK_M
            off_n = ((tile % per_group) // group_m) * BLOCK_N
            acc_v = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for ki in range(k_tiles):
                a = x_desc.load([off_m, ki * BLOCK_K])
                acc_v = tl.dot(a, wv_desc.load([off_n, ki * BLOCK_K]).T, acc_v)
                acc_g = tl.dot(a, wg_desc.load([off_n, ki * BLOCK_K]).T, acc_g)
            if HAS_BIAS:
                cols = off_n + tl.arange(0, BLOCK_N)
                acc_v += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
                acc_g += tl.load(b_ptr + N + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            dtype = out_desc.dtype
            value = acc_v.to(dtype).to(tl.float32)  # rounded as the unfused matmul writes it
            gate = acc_g.to(dtype).to(tl.float32)
            gelu = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))  # exact GELU, as F.gelu
            out_desc.store([off_m, off_n], (value * gelu.to(dtype).to(tl.float32)).to(dtype))  # F.gelu rounds too


def block_config(m: int, n: int, k: int) -> dict | None:
    """Tile sizes for an [m, k] x [k, 2n] GEGLU, or None where the fused kernel is not the faster.

    Measured on an H100 (bench/gpu_geglu.py, session 9): it wins where K is small and there are many
    rows (SD-1.5's 320- and 640-wide blocks: 1.03-1.28x), where the 2N-wide product's round trip
    through memory outweighs the matmul itself; at K = 1280 cuBLAS's matmul alone is faster."""
    if k > 640 or m * k < 8192 * 320:
        return None
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, WARP_SPECIALIZE=True, num_warps=8, num_stages=3)


def geglu_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: dict | None = None):
    """geglu_kernel over x's rows; x [..., K] any batch shape, weight [2N, K]."""
    k, n = x.shape[-1], weight.shape[0] // 2
    x2 = x.reshape(-1, k).contiguous()
    weight = weight.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    config = config or block_config(m, n, k)
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    programs = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    if x.is_cuda:
        programs = min(programs, torch.cuda.get_device_properties(x.device).multi_processor_count)
    geglu_kernel[(programs,)](
        TensorDescriptor.from_tensor(x2, [bm, bk]), TensorDescriptor.from_tensor(weight[:n], [bn, bk]),
        TensorDescriptor.from_tensor(weight[n:], [bn, bk]), TensorDescriptor.from_tensor(out, [bm, bn]),
        weight if bias is None else bias, m, n, k, HAS_BIAS=bias is not None, NUM_SMS=programs, **config)
    return out.reshape(*x.shape[:-1], n)


def fused_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Where geglu_kernel runs: Triton present, a CUDA tensor in half precision, rows of 16-byte multiples (TMA)."""
    return (triton is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x.dtype
            and x.shape[-1] % 8 == 0 and weight.shape[0] % 16 == 0)


def fuses(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether FusedGEGLU calls the fused op for this input: the kernel runs here and is the faster."""
    k = x.shape[-1]
    return fused_supported(x, weight) and block_config(x.numel() // k, len(weight) // 2, k) is not None


@torch.library.custom_op("ldm::geglu", mutates_args=())
def geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """value * gelu(gate) of `F.linear(x, weight, bias)`'s two halves; fused on CUDA, PyTorch ops elsewhere."""
    if fused_supported(x, weight):
        return geglu_triton(x, weight, bias)
    return geglu_reference(x, weight, bias)


@geglu.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0] // 2)


class FusedGEGLU(torch.nn.Module):
    """diffusers' GEGLU with its projection and gate as one `ldm::geglu` call; the same `proj` layer,
    so state dicts and weights are unchanged."""

    def __init__(self, geglu_module):
        super().__init__()
        self.proj = geglu_module.proj

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        weight, bias = self.proj.weight, self.proj.bias
        if fuses(hidden_states, weight):  # decided when torch.compile traces: shapes are fixed there
            return torch.ops.ldm.geglu(hidden_states, weight, bias)
        return geglu_reference(hidden_states, weight, bias)  # where the fused kernel is not the faster


def use_fused_geglu(model: torch.nn.Module) -> int:
    """Swap every diffusers GEGLU in `model` whose projection is a plain nn.Linear (not LoRA-wrapped)
    for FusedGEGLU; returns how many were swapped."""
    from diffusers.models.activations import GEGLU

    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is GEGLU and type(child.proj) is torch.nn.Linear:
                setattr(module, name, FusedGEGLU(child))
                swapped += 1
    return swapped


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, WARP_SPECIALIZE, num_warps, num_stages)
CONFIGS = ((128, 64, 64, 8, False, 4, 3), (128, 64, 64, 8, False, 4, 4), (128, 64, 64, 8, False, 8, 3),
           (128, 128, 64, 8, False, 8, 3), (128, 128, 64, 8, False, 8, 4), (64, 128, 64, 8, False, 4, 4),
           (256, 64, 64, 8, False, 8, 3), (128, 128, 32, 8, False, 8, 4), (128, 64, 64, 8, True, 4, 3),
           (128, 64, 64, 8, True, 8, 3), (128, 128, 64, 8, True, 8, 3), (128, 128, 64, 8, True, 8, 4))
SHAPES = ((320, 4096), (640, 1024), (1280, 256), (1280, 64))  # (width C, tokens per latent)


def graphed_ms(fn, calls=20, rounds=5):
    """ms per call of fn, replayed from a CUDA graph of `calls` calls; best of `rounds`."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    best = float("inf")
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / calls)
    return best


def as_config(c):
    return dict(BLOCK_M=c[0], BLOCK_N=c[1], BLOCK_K=c[2], GROUP_M=c[3], WARP_SPECIALIZE=c[4], num_warps=c[5],
                num_stages=c[6])


def main():
    from diffusers.models.activations import GEGLU

    dev = torch.device("cuda")
    emit(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__))
    _tune_inductor()
    best_configs = {}  # "m,n,k" -> the fastest fused configuration where it beats the unfused path, else None
    for unet_batch in (16, 2):
        for width, tokens in SHAPES:
            m = unet_batch * tokens
            g = torch.Generator(dev).manual_seed(0)
            module = GEGLU(width, 4 * width).to(dev, torch.float16)
            x = torch.randn(unet_batch, tokens, width, device=dev, dtype=torch.float16, generator=g)
            w, b = module.proj.weight.detach(), module.proj.bias.detach()
            with torch.no_grad():
                ref = geglu_reference(x.float(), w.float(), b.float())
                compiled = torch.compile(module, fullgraph=True, dynamic=False)
                err_unfused = (compiled(x).float() - ref).abs().max().item()
                times = {"matmul only": graphed_ms(lambda: torch.nn.functional.linear(x, w, b)),
                         "unfused, eager": graphed_ms(lambda: module(x)),
                         "unfused, compiled": graphed_ms(lambda: compiled(x))}
                errs = {}
                for c in CONFIGS:
                    name = "fused " + "/".join(map(str, c))
                    try:
                        errs[name] = (geglu_triton(x, w, b, as_config(c)).float() - ref).abs().max().item()
                        times[name] = graphed_ms(lambda c=c: geglu_triton(x, w, b, as_config(c)))
                    except Exception as e:  # noqa: BLE001 (a configuration that does not compile or fit)
                        print(f"{name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                picked = graphed_ms(lambda: geglu_triton(x, w, b))
            fused = {k: v for k, v in times.items() if k.startswith("fused")}
            best = min(fused, key=fused.get)
            wins = fused[best] < times["unfused, compiled"]
            best_configs[f"{m},{4 * width},{width}"] = as_config(CONFIGS[list(fused).index(best)]) if wins else None
            flop = 2 * m * width * 8 * width
            emit(dict(unet_batch=unet_batch, width=width, tokens=tokens, m=m,
                      ms={k: round(v, 4) for k, v in times.items()}, best_fused=best, best_fused_ms=round(fused[best], 4),
                      picked_ms=round(picked, 4), picked=block_config(m, 4 * width, width),
                      unfused_ms=round(times["unfused, compiled"], 4),
                      speedup=round(times["unfused, compiled"] / fused[best], 3),
                      matmul_tflops=round(flop / times["matmul only"] / 1e9, 1),
                      fused_tflops=round(flop / fused[best] / 1e9, 1),
                      max_abs_unfused=round(err_unfused, 5), max_abs_fused=round(errs[best], 5),
                      ref_max=round(ref.abs().max().item(), 2)))
    # bf16: the same kernel, checked once
    x = torch.randn(2, 1024, 640, device=dev, dtype=torch.bfloat16)
    module = GEGLU(640, 2560).to(dev, torch.bfloat16)
    w, b = module.proj.weight.detach(), module.proj.bias.detach()
    with torch.no_grad():
        ref = geglu_reference(x.float(), w.float(), b.float())
        emit(dict(bf16_max_abs_fused=round((geglu_triton(x, w, b).float() - ref).abs().max().item(), 5),
                  bf16_max_abs_unfused=round((module(x).float() - ref).abs().max().item(), 5)))
    print_table(("U-Net batch", "C", "tokens", "matmul only ms", "unfused compiled ms", "fused best ms", "best config",
                 "picked ms", "speedup", "max abs unfused / fused"), ROWS,
                lambda r: [r["unet_batch"], r["width"], r["tokens"], r["ms"]["matmul only"], r["unfused_ms"],
                           r["best_fused_ms"], r["best_fused"], r["picked_ms"], f"{r['speedup']}x",
                           f"{r['max_abs_unfused']} / {r['max_abs_fused']}"] if "width" in r else None)
    save_jsonl("geglu.jsonl", ROWS)
    if os.environ.get("OUT"):  # for gpu_streams.py --geglu-configs
        with open(os.path.join(os.environ["OUT"], "geglu_best.json"), "w") as f:
            json.dump(best_configs, f, indent=1)


if __name__ == "__main__":
    main()
