"""Where the time of one batch-8 (CFG batch 16) SD-1.5 U-Net call goes, and what changes it.

`--batch` sets the U-Net batch (16 = batch 8 with guidance, the default; 2 = batch 1).

On the GPU machine, one process, SD-1.5-shaped random weights (bench/gpu_sample.py's `build`):
1. attention alone, per SD-1.5 attention shape at batch 16, for each SDPA backend (flash, efficient,
   cuDNN): ms per call and TFLOP/s, and the attention time one U-Net call would spend with each;
2. the U-Net compiled as `ldm --accel compile` compiles it, once per variant (`--variants`), each timed
   over `--calls` calls replayed as one CUDA graph as the sampler runs it (and without the graph), and
   profiled: kernel time by kind (convolution, matmul, attention, Triton fused kernels, other), the top
   kernels and the top Triton kernels. Variants:
   `base`         today's settings, PyTorch's own choice of attention kernel (cuDNN's on an H100, torch 2.11);
   `flash`        FlashAttention-2 forced;
   `freeze`       inductor freezing (weights become constants, convolution weights laid out once);
   `autotune-mm`  inductor autotunes its matmuls against Triton templates, with epilogue fusion (slow);
   `pw-autotune`  inductor autotunes its pointwise/reduction kernels' block sizes;
   `coord`        coordinate-descent tuning of those block sizes;
   `combo`        horizontal fusion of independent kernels;
   `nd-tiling`    inductor's N-d tiling of pointwise kernels (for layout-changing ones);
   `no-coalesce`  inductor's older tiling choice, without its coalescing analysis;
   `cl-cat`       ldm's graph pass keeping channels-last concatenations channels-last (accel.py; ldm's
                  default since session 5, while `base` here keeps session 4's settings, without it);
   `pdl`          programmatic dependent launch between Triton kernels (Hopper);
   `cl-gn`        ChannelsLastGroupNorm (below) in place of nn.GroupNorm: per-channel sums first;
   `geglu`        the feed-forwards' GEGLU as bench/gpu_geglu.py's fused kernel (on a copy of the U-Net);
   `coop`         inductor's cooperative reductions (one kernel where it would split a reduction in two);
   `nchw`         the network in the default NCHW layout, and inductor's layout optimisation off (it makes
                  convolutions channels-last whatever the module's layout): a GroupNorm group is then
                  contiguous in memory (session 10);
   `bandwidth`    inductor benchmarks every Triton kernel it launches and writes ms, GB and GB/s per
                  kernel to $OUT/bandwidth-<variant>.txt (it fails on torch 2.11 for this model).
   Variants combine with `+`;
3. the compiled VAE decoder at batch 8, once per `--vae-variants` variant (same names).
Prints JSON lines and a table; writes $OUT/b8_breakdown.jsonl.

    python bench/gpu_b8_breakdown.py --variants base,flash,freeze
"""

import argparse
import contextlib
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(__file__))
from gpu_geglu import use_fused_geglu  # noqa: E402
from gpu_sample import build  # noqa: E402
from report import ROWS, emit, print_table, save_jsonl  # noqa: E402

from ldm_cli.accel import GraphedUNet, channels_last_concat_pass  # noqa: E402

BATCH = 16  # batch 8 with classifier-free guidance
# SD-1.5 attention per U-Net call: (query tokens, channels, how many transformer blocks at that size)
LEVELS = [(4096, 320, 5), (1024, 640, 5), (256, 1280, 5), (64, 1280, 1)]
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}


def cuda_ms(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def attention_table(dev, batch):
    """SDPA alone, in diffusers' layout (B, L, H*D) viewed as (B, H, L, D)."""
    per_call = {name: 0.0 for name in BACKENDS}
    for tokens, channels, blocks in LEVELS:
        for kind, keys in (("self", tokens), ("cross", 77)):
            q = torch.randn(batch, tokens, channels, device=dev, dtype=torch.float16)
            kv = torch.randn(batch, keys, channels, device=dev, dtype=torch.float16)
            split = lambda t: t.view(batch, -1, 8, channels // 8).transpose(1, 2)  # noqa: E731
            flops = 4 * batch * tokens * keys * channels
            row = dict(attention=kind, tokens=tokens, keys=keys, head_dim=channels // 8, blocks=blocks)
            for name, backend in BACKENDS.items():
                try:
                    with sdpa_kernel(backend):
                        ms = cuda_ms(lambda: F.scaled_dot_product_attention(split(q), split(kv), split(kv)))
                    row[f"{name}_ms"] = round(ms, 4)
                    row[f"{name}_tflops"] = round(flops / ms / 1e9, 1)
                    per_call[name] += ms * blocks
                except RuntimeError as e:
                    row[f"{name}_ms"] = None
                    row[f"{name}_error"] = str(e).splitlines()[0][:80]
                    per_call[name] = float("nan")
            emit(row)
    emit({"attention_ms_per_unet_call": {k: round(v, 3) for k, v in per_call.items()}})


def kind_of(kernel):
    k = kernel.lower()
    if any(s in k for s in ("flash", "fmha", "sdpa", "attn", "attention")):
        return "attention"
    if k.startswith("triton") or "triton_" in k:
        return "triton fused"
    if any(s in k for s in ("conv", "fprop", "dgrad", "implicit", "winograd", "nchwtonhwc", "nhwctonchw")):
        return "convolution"
    if any(s in k for s in ("gemm", "nvjet", "cutlass", "xmma", "cublas")):
        return "matmul"
    return "other"


def profile_kinds(fn, calls=3):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [(e.key, e.self_device_time_total / calls / 1000, e.count // calls)
               for e in prof.key_averages() if e.self_device_time_total > 0]
    kinds = {}
    for name, ms, _ in kernels:
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0) + ms
    top = sorted(kernels, key=lambda k: -k[1])
    triton = [k for k in top if kind_of(k[0]) == "triton fused"][:40]
    return ({k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            [(n[:90], round(ms, 3), count) for n, ms, count in top[:15]],
            [(n[:120], round(ms, 4), count) for n, ms, count in triton],
            sum(count for _, _, count in kernels))


def configure(variant):
    """Inductor settings as ldm --accel compile sets them, changed as the variant's name says; returns the
    attention-backend context to trace in (PyTorch's default choice unless the variant forces flash)."""
    import torch._inductor.config as inductor

    torch._dynamo.reset()
    inductor.conv_1x1_as_mm = True
    inductor.epilogue_fusion = "autotune-mm" in variant  # only Triton matmul templates take epilogues
    inductor.freezing = "freeze" in variant
    inductor.max_autotune_gemm = "autotune-mm" in variant
    inductor.max_autotune_gemm_backends = "ATEN,TRITON"
    inductor.max_autotune_pointwise = "pw-autotune" in variant
    inductor.coordinate_descent_tuning = "coord" in variant
    inductor.combo_kernels = "combo" in variant
    inductor.triton.prefer_nd_tiling = "nd-tiling" in variant
    inductor.triton.coalesce_tiling_analysis = "no-coalesce" not in variant
    inductor.triton.enable_pdl = "pdl" in variant
    inductor.post_grad_custom_post_pass = channels_last_concat_pass() if "cl-cat" in variant else None
    inductor.triton.cooperative_reductions = "coop" in variant
    inductor.layout_optimization = "nchw" not in variant
    inductor.profile_bandwidth = "bandwidth" in variant
    if "bandwidth" in variant:
        inductor.profile_bandwidth_output = os.path.join(os.environ.get("OUT", "."), f"bandwidth-{variant}.txt")
    if "flash" in variant:
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION], set_priority=True)
    return contextlib.nullcontext()


class ChannelsLastGroupNorm(torch.nn.GroupNorm):
    """GroupNorm whose statistics inductor reads coalesced from a channels-last tensor.

    Same parameters and math as `nn.GroupNorm` (fp32 statistics, two-pass variance); only the order
    of the sums differs. Why: inductor reduces each (sample, group) over a channels-last tensor where
    a group is 4-10 adjacent channels out of 128-1280 per pixel, so its reduction kernels read a few
    bytes out of every row (2.7 ms for one GroupNorm of the batch-8 VAE decoder at 512 px, a 537 MB
    tensor: ~0.4 TB/s). Summing over pixels per channel first reads whole rows; the per-group sums are
    then tiny. An experiment (the `cl-gn` variants), not in ldm: measured in session 5, the batch-8 VAE
    decoder went 67.0 -> 54.8 ms, the U-Net did not clearly gain, and the full pipeline's agreement with
    diffusers was not measured (bench/RESULTS.md). Its CPU parity tests are in commit 'accel:
    ChannelsLastGroupNorm under --accel compile'."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        per_group = c // self.num_groups
        pixels = tuple(range(2, x.dim()))
        count = x[0, 0].numel() * per_group
        broadcast = (n, c) + (1,) * len(pixels)

        def per_channel(group_values):  # (n, groups) -> (n, c, 1, ...)
            return group_values[:, :, None].expand(n, self.num_groups, per_group).reshape(broadcast)

        x32 = x.float()
        mean = x32.sum(pixels).view(n, self.num_groups, per_group).sum(-1) / count
        centered = x32 - per_channel(mean)
        var = centered.square().sum(pixels).view(n, self.num_groups, per_group).sum(-1) / count
        y = centered * per_channel(torch.rsqrt(var + self.eps))
        if self.affine:
            shape = (1, c) + (1,) * len(pixels)
            y = y * self.weight.float().view(shape) + self.bias.float().view(shape)
        return y.to(x.dtype)


def set_group_norms(module, variant):
    """ChannelsLastGroupNorm for the `cl-gn` variants, nn.GroupNorm otherwise (same parameters)."""
    cls = ChannelsLastGroupNorm if "cl-gn" in variant else torch.nn.GroupNorm
    for m in module.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.__class__ = cls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="base,flash,freeze")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--batch", type=int, default=BATCH, help="U-Net batch (2 x images under guidance)")
    ap.add_argument("--skip-attention", action="store_true")
    ap.add_argument("--skip-vae", action="store_true")
    ap.add_argument("--vae-variants", default="base")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    emit(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
              cudnn=torch.backends.cudnn.version()))
    if not args.skip_attention:
        attention_table(dev, args.batch)
    unet, vae, _ = build(dev, torch.float16)
    unet.to(memory_format=torch.channels_last)
    vae.to(memory_format=torch.channels_last)
    unet.fuse_qkv_projections()
    g = torch.Generator(dev).manual_seed(0)
    x = torch.randn(args.batch, 4, 64, 64, device=dev, dtype=torch.float16, generator=g)
    t = torch.full((args.batch,), 500, device=dev)
    ctx = torch.randn(args.batch, 77, 768, device=dev, dtype=torch.float16, generator=g)
    reference = None
    for variant in filter(None, args.variants.split(",")):  # --variants "": the VAE only
        set_group_norms(unet, variant)
        unet.to(memory_format=torch.contiguous_format if "nchw" in variant else torch.channels_last)
        model = unet
        if "geglu" in variant:
            model = copy.deepcopy(unet)
            use_fused_geglu(model)
        with torch.no_grad(), configure(variant):
            compiled = torch.compile(model, fullgraph=True, dynamic=False)
            call = lambda: compiled(x, t, encoder_hidden_states=ctx, return_dict=False)[0]  # noqa: E731
            t0 = time.perf_counter()
            print(f"compiling {variant}", flush=True)
            out = call().clone()
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            if "bandwidth" in variant:  # every launch was benchmarked: its timings are not comparable
                print(f"bandwidth profile written after {compile_s:.0f} s", flush=True)
                continue
            ms = cuda_ms(call, args.calls)
            graphed = GraphedUNet(compiled)  # as the sampler runs it: one CUDA graph, no launch gaps
            graphed_ms = cuda_ms(lambda: graphed(x, t, ctx), args.calls)
            kinds, top, triton, launches = profile_kinds(call)
        if reference is None:
            reference = out
        diff = (out.float() - reference.float()).abs()
        emit(dict(variant=variant, batch=args.batch, compile_s=round(compile_s, 1), unet_ms=round(graphed_ms, 3),
                  unet_ms_no_graph=round(ms, 3),
                  images_per_s_unet_only=round(args.batch / 2 / (50 * graphed_ms / 1000), 3),
                  kernel_sum_ms=round(sum(kinds.values()), 3), kernel_launches=launches, kinds_ms=kinds,
                  max_abs_vs_first=round(diff.max().item(), 5), mean_abs_vs_first=round(diff.mean().item(), 6),
                  top_kernels=top, triton_kernels=triton))
    z = torch.randn(8, 4, 64, 64, device=dev, dtype=torch.float16, generator=g)
    first_image = None
    for variant in [] if args.skip_vae else args.vae_variants.split(","):
        set_group_norms(vae, variant)
        vae.to(memory_format=torch.contiguous_format if "nchw" in variant else torch.channels_last)
        with torch.no_grad(), configure(variant):
            decoder = torch.compile(vae.decoder, fullgraph=True, dynamic=False)
            t0 = time.perf_counter()
            image = decoder(z).clone()
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            ms = cuda_ms(lambda: decoder(z), 5)
            kinds, top, _, _ = profile_kinds(lambda: decoder(z), 1)
        first_image = image if first_image is None else first_image
        diff = (image.float() - first_image.float()).abs()
        emit(dict(vae_variant=variant, vae_decoder_batch8_ms=round(ms, 2), compile_s=round(compile_s, 1),
                  max_abs_vs_first=round(diff.max().item(), 5), kinds_ms=kinds, top_kernels=top[:8]))
    print_table(("variant", "U-Net batch", "compile s", "U-Net ms (CUDA graph)", "images/s (U-Net only)",
                 "kernel sum ms", "kernels", "kernel ms by kind"), ROWS,
                lambda r: [r["variant"], r["batch"], r["compile_s"], r["unet_ms"], r["images_per_s_unet_only"],
                           r["kernel_sum_ms"], r["kernel_launches"], r["kinds_ms"]] if "variant" in r else None)
    save_jsonl("b8_breakdown.jsonl", ROWS)


if __name__ == "__main__":
    main()
