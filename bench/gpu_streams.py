"""Ways to run one guided U-Net call: as concurrent parts of its batch (CUDA streams forked inside one
CUDA graph)? With the first self-attention shared by the two halves (models.call_unet)?

Why it might be: the compiled batch-16 SD-1.5 U-Net call is ~1,000 kernels whose sum is 1.5 ms below
the graphed call's time (gaps and last partial waves), and 7 ms of it are bandwidth-bound Triton
kernels. With classifier-free guidance the batch is two independent halves (unconditional, conditional):
run on two streams, one half's compute-bound kernel can fill the SMs the other half leaves idle.

On the GPU machine, one process, SD-1.5-shaped random weights (gpu_sample.py's `build`), fused QKV.
For each mode (`eager`: ldm's default `auto` path, CUDA graphs without compile; `compile`: as
`ldm --accel compile`) and U-Net batch (16 = batch 8 with guidance, 2 = batch 1), times the graphed
call (accel.GraphedUNet) with the batch whole, in halves one after the other on one stream, in
halves (or quarters) on concurrent streams, and given each latent once with the first self-attention
shared by both halves, and (session 8) that plus the projections that share an input run as one matmul
each (accel.group_shared_input_projections, on a copy of the U-Net), and (session 9) that plus the
feed-forwards' GEGLU as one fused kernel (bench/gpu_geglu.py, not in ldm), and (session 10) the grouped
projections with the first ResNet block shared too (share_first_resnet, not in ldm), and (session 11) the
grouped projections with cuBLAS accumulating in fp16 (FP16AccumulationGraphedUNet); rounds interleave
the runners so drift hits all alike.
Also times SDPA alone over head dims (is SD-1.5's head-dim-40 attention bound by its softmax?).
Prints JSON lines and a table; writes $OUT/streams.jsonl.

    python bench/gpu_streams.py --modes eager,compile --batches 16,2
    python bench/gpu_streams.py --skip-head-dims --runners "first self-attention shared"
    python bench/gpu_streams.py --skip-head-dims --runners "first self-attention shared,+ projections grouped"
    python bench/gpu_streams.py --skip-head-dims --modes compile --base "+ projections grouped" \
        --runners "+ first ResNet shared"
    python bench/gpu_streams.py --skip-head-dims --modes compile --base "+ projections grouped" \
        --runners "+ fp16 accumulation"
"""

import argparse
import copy
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import gpu_geglu  # noqa: E402
from gpu_b8_breakdown import cuda_ms  # noqa: E402
from gpu_sample import build  # noqa: E402
from report import ROWS, emit, print_table, save_jsonl  # noqa: E402

from ldm_cli.accel import GraphedUNet, _tune_inductor, group_shared_input_projections  # noqa: E402
from ldm_cli.models import first_self_attention  # noqa: E402


def share_first_resnet(unet):
    """Session 10's lever, measured and not adopted: guidance's halves share the first ResNet block too.

    Nothing before the first cross-attention reads the context, so the first down block's first ResNet
    block gets equal halves as well; hooks run it on the first half and repeat its output, while the
    first self-attention's wrapper (models.SharedHalvesAttention) has `halves_equal` set (call_unet sets
    it around guided calls). Its time-embedding projection gets the whole batch and only its output is
    halved, because accel's grouped projections compute all the ResNets' projections at the first one's
    call. The code measured was commit d3c8dd8's models.SharedHalves; this does the same."""
    shared = first_self_attention(unet)
    resnet = unet.down_blocks[0].resnets[0]
    resnet.register_forward_pre_hook(lambda m, args: (args[0][:len(args[0]) // 2], *args[1:])
                                     if shared.halves_equal else None)
    resnet.time_emb_proj.register_forward_hook(lambda m, args, out: out[:len(out) // 2] if shared.halves_equal else None)
    resnet.register_forward_hook(lambda m, args, out: torch.cat([out, out]) if shared.halves_equal else None)


class StreamsGraphedUNet(GraphedUNet):
    """accel.GraphedUNet with the batch split into `streams` parts, each on its own CUDA stream, forked
    and joined inside the captured graph (tried in session 6 and not adopted: slower)."""

    def __init__(self, unet, streams):
        super().__init__(unet)
        self.streams = [torch.cuda.Stream() for _ in range(streams)]

    def _forward(self, x, t, context):
        main, n = torch.cuda.current_stream(), len(self.streams)
        outs = []
        for stream, xs, cs in zip(self.streams, x.chunk(n), context.chunk(n)):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                outs.append(self.unet(xs, t, encoder_hidden_states=cs, return_dict=False)[0])
        for stream, out in zip(self.streams, outs):
            main.wait_stream(stream)
            out.record_stream(main)
        return torch.cat(outs)


class FP16AccumulationGraphedUNet(GraphedUNet):
    """accel.GraphedUNet whose graphs are captured with cuBLAS accumulating fp16 matmuls in fp16
    (`torch.backends.cuda.matmul.allow_fp16_accumulation`, read at each cuBLAS call, so the captured
    kernels keep it). Session 11's lever: the matmuls are ~8.4 ms of the batch-16 call; cuDNN's
    convolutions and the attention are unaffected."""

    def _capture(self, x, t, context):
        torch.backends.cuda.matmul.allow_fp16_accumulation = True
        try:
            return super()._capture(x, t, context)
        finally:
            torch.backends.cuda.matmul.allow_fp16_accumulation = False


class Halves(torch.nn.Module):
    """The U-Net called on each half of the batch in turn, on one stream: the batch-size effect alone."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, encoder_hidden_states, return_dict=False):
        h = len(x) // 2
        return (torch.cat([self.unet(x[:h], t, encoder_hidden_states=encoder_hidden_states[:h], return_dict=False)[0],
                           self.unet(x[h:], t, encoder_hidden_states=encoder_hidden_states[h:], return_dict=False)[0]]),)


def head_dim_sweep(dev):
    """cuDNN/default SDPA at SD-1.5's 64x64 self-attention shape (batch 16, 8 heads, 4096 tokens) over head dims."""
    for d in (32, 40, 48, 64, 80, 128):
        q, k, v = (torch.randn(16, 8, 4096, d, device=dev, dtype=torch.float16) for _ in range(3))
        ms = cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v), 10)
        emit(dict(sdpa_head_dim=d, ms=round(ms, 4), tflops=round(4 * 16 * 8 * 4096**2 * d / ms / 1e9, 1),
                  scores_per_ns=round(16 * 8 * 4096**2 / ms / 1e6, 1)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="eager,compile")
    ap.add_argument("--batches", default="16,2")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runners", default="halves, one stream,halves, 2 streams,quarters, 4 streams",
                    help="besides --base: any of these, or 'first self-attention shared' (session 6b), "
                         "'+ projections grouped' (session 8), '+ GEGLU fused' (session 9: grouped and fused), "
                         "'+ first ResNet shared' (session 10: grouped, ResNet and attention shared), "
                         "'+ fp16 accumulation' (session 11: grouped, matmuls accumulating in fp16)")
    ap.add_argument("--base", default="whole", help="the runner the others are compared with")
    ap.add_argument("--skip-head-dims", action="store_true")
    ap.add_argument("--geglu-configs", help="JSON from gpu_geglu.py: the fused GEGLU's configuration per shape")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    # The runners' U-Net copies can differ only in module hooks (share_first_resnet), which dynamo does not guard
    # by default: a copy would replay another's compiled code (session 10's first run did).
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    if args.geglu_configs:  # measured per shape instead of gpu_geglu.block_config's rule
        with open(args.geglu_configs) as f:
            measured = json.load(f)
        gpu_geglu.block_config = lambda m, n, k: measured.get(f"{m},{n},{k}")
        emit(dict(geglu_configs=measured))
    emit(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__))
    if not args.skip_head_dims:
        head_dim_sweep(dev)
    unet, _, _ = build(dev, torch.float16)
    unet.fuse_qkv_projections()
    wanted = {args.base, *args.runners.split(",")}
    grouped = copy.deepcopy(unet) if {"+ projections grouped", "+ fp16 accumulation"} & wanted else None
    fused = copy.deepcopy(unet) if "+ GEGLU fused" in wanted else None
    resnet = copy.deepcopy(unet) if "+ first ResNet shared" in wanted else None
    if resnet is not None:
        group_shared_input_projections(resnet)
        share_first_resnet(resnet)
    if grouped is not None:
        emit(dict(projection_groups=[len(g.weight) for g in group_shared_input_projections(grouped)]))
    if fused is not None:  # the projections grouped too: what --accel compile does
        group_shared_input_projections(fused)
        emit(dict(geglu_fused=gpu_geglu.use_fused_geglu(fused)))
    for mode in args.modes.split(","):
        fn, fn_grouped, fn_fused, fn_resnet = unet, grouped, fused, resnet
        if mode == "compile":  # as accel.accelerate(mode="compile") sets it up
            torch.backends.cudnn.benchmark = True
            _tune_inductor()
            for m in (unet, grouped, fused, resnet):
                if m is not None:
                    m.to(memory_format=torch.channels_last)
            fn = torch.compile(unet, fullgraph=True, dynamic=False)
            fn_grouped = None if grouped is None else torch.compile(grouped, fullgraph=True, dynamic=False)
            fn_fused = None if fused is None else torch.compile(fused, fullgraph=True, dynamic=False)
            fn_resnet = None if resnet is None else torch.compile(resnet, fullgraph=True, dynamic=False)
        for batch in map(int, args.batches.split(",")):
            g = torch.Generator(dev).manual_seed(0)
            x = torch.randn(batch // 2, 4, 64, 64, device=dev, dtype=torch.float16, generator=g).repeat(2, 1, 1, 1)
            t = torch.tensor(500, device=dev)
            ctx = torch.randn(batch, 77, 768, device=dev, dtype=torch.float16, generator=g)
            shared = GraphedUNet(fn)  # given the latents once: call_unet shares the first self-attention
            shared_grouped = None if fn_grouped is None else GraphedUNet(fn_grouped)
            shared_fused = None if fn_fused is None else GraphedUNet(fn_fused)
            shared_resnet = None if fn_resnet is None else GraphedUNet(fn_resnet)
            shared_fp16acc = None if fn_grouped is None else FP16AccumulationGraphedUNet(fn_grouped)
            runners = {"whole": GraphedUNet(fn), "halves, one stream": GraphedUNet(Halves(fn)),
                       "halves, 2 streams": StreamsGraphedUNet(fn, 2), "quarters, 4 streams": StreamsGraphedUNet(fn, 4),
                       "first self-attention shared": lambda x, t, ctx: shared(x[:len(x) // 2], t, ctx),
                       "+ projections grouped": lambda x, t, ctx: shared_grouped(x[:len(x) // 2], t, ctx),
                       "+ GEGLU fused": lambda x, t, ctx: shared_fused(x[:len(x) // 2], t, ctx),
                       "+ first ResNet shared": lambda x, t, ctx: shared_resnet(x[:len(x) // 2], t, ctx),
                       "+ fp16 accumulation": lambda x, t, ctx: shared_fp16acc(x[:len(x) // 2], t, ctx)}
            runners = {k: v for k, v in runners.items() if k == args.base or k in args.runners.split(",")}
            if batch < 8:
                runners.pop("quarters, 4 streams", None)
            first, outs = {}, {}
            for name, runner in runners.items():
                t0 = time.perf_counter()
                outs[name] = runner(x, t, ctx).clone()
                torch.cuda.synchronize()
                first[name] = time.perf_counter() - t0
                print(f"{mode} batch {batch} {name}: first call {first[name]:.1f} s", flush=True)
            times = {name: [] for name in runners}
            for _ in range(args.rounds):
                for name, runner in runners.items():
                    times[name].append(cuda_ms(lambda: runner(x, t, ctx), args.calls))
            for name in runners:
                diff = (outs[name].float() - outs[args.base].float()).abs()
                best = min(times[name])
                emit(dict(mode=mode, unet_batch=batch, runner=name, ms=round(best, 3),
                          ms_rounds=[round(v, 3) for v in times[name]],
                          base=args.base, speedup_vs_base=round(min(times[args.base]) / best, 4),
                          first_call_s=round(first[name], 1),
                          max_abs_vs_base=round(diff.max().item(), 5), mean_abs_vs_base=round(diff.mean().item(), 6)))
            del runners
            torch.cuda.empty_cache()
    print_table(("mode", "U-Net batch", "runner", "ms per call (best round)", "vs base", "max abs vs base"), ROWS,
                lambda r: [r["mode"], r["unet_batch"], r["runner"], r["ms"], f"{r['speedup_vs_base']}x",
                           r["max_abs_vs_base"]] if "runner" in r else None)
    save_jsonl("streams.jsonl", ROWS)


if __name__ == "__main__":
    main()
