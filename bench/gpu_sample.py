"""ldm's sampler vs diffusers' StableDiffusionPipeline on SD-1.5-shaped random weights, one process.

Same weights, same CPU-generator seeds, fp16, 512x512, 50 DDIM steps, cfg 7.5; text embeddings are
made once up front for both (as in ../shared/reference/anchor_diffusers.py). Speed does not depend
on weight values. Prints one JSON line per setting and a table; writes $OUT/gpu_sample.jsonl.

    python bench/gpu_sample.py --modes diffusers,none,graphs   # eager rows + CUDA graphs
    python bench/gpu_sample.py --modes compile                  # torch.compile + graphs (slow first time)
    python bench/gpu_sample.py --modes diffusers,diffusers-compile,compile   # acceptance: the anchor, same run
A mode ending in -nhwc / -nchw forces channels_last on / off (default: on for compile only).
Session 11's variants, after a "+": fp16acc (cuBLAS accumulating fp16 matmuls in fp16), fp8lin / fp8all
(the U-Net's linear layers / linear and conv layers given FP8 E4M3 weights and inputs, simulated:
their agreement, not their speed):

    python bench/gpu_sample.py --modes diffusers,compile+fp16acc
    python bench/gpu_sample.py --modes diffusers,none+fp8lin,none+fp8all --batches 1
"""

import argparse
import json
import time

import torch
from report import print_table, save_jsonl  # bench/report.py (this script's folder is on sys.path)

from ldm_cli import pipeline
from ldm_cli.accel import accelerate
from ldm_cli.config import Settings
from ldm_cli.models import Components
from ldm_cli.schedule import schedule_from_config

PEAK = 989e12  # H100 SXM dense bf16/fp16, the anchor's MFU denominator
SCHED = dict(_class_name="DDIMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             clip_sample=False, set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)


def build(dev, dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, vocab_size=49408,
                                        hidden_act="quick_gelu"))
    for m in (unet, vae, text):
        m.to(dev, dtype).eval().requires_grad_(False)
    return unet, vae, text


def fp8_round_trip(x):
    """`x` through float8_e4m3fn and back with one scale per tensor (its largest |x| to E4M3's 448): the
    values an FP8 matmul with per-tensor scaling would multiply."""
    scale = x.abs().amax().float().clamp(min=1e-12) / 448
    return ((x.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def simulate_fp8(unet, kinds):
    """The weights and inputs of `unet`'s layers of `kinds` rounded as FP8 would round them (the
    products and sums stay fp16/fp32): what FP8 does to the outputs, not to the speed."""
    for m in unet.modules():
        if isinstance(m, kinds) and not getattr(m, "fp8_simulated", False):
            m.fp8_simulated = True
            m.weight.data = fp8_round_trip(m.weight.data)
            m.register_forward_pre_hook(lambda m, args: (fp8_round_trip(args[0]), *args[1:]))


def timed(fn, reps):
    fn()  # warm-up (and capture / compile)
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2], out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="diffusers,none,graphs")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--img2img", action="store_true", help="also time img2img at strength 0.75")
    args = ap.parse_args()
    dev, dtype = torch.device("cuda"), torch.float16
    torch._dynamo.config.cache_size_limit = 64  # the anchor and ours compile the same U-Net code
    unet, vae, text = build(dev, dtype)
    with torch.no_grad():
        emb = text(torch.randint(0, 49408, (1, 77), device=dev))[0]
        neg = text(torch.randint(0, 49408, (1, 77), device=dev))[0]
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        unet(torch.randn(2, 4, 64, 64, device=dev, dtype=dtype), torch.tensor([500, 500], device=dev),
             encoder_hidden_states=torch.cat([neg, emb]))
    unet_flops_b2 = fc.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        vae.decode(torch.randn(1, 4, 64, 64, device=dev, dtype=dtype))
    vae_flops = fc.get_total_flops()
    header = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, unet_flops_batch2=unet_flops_b2,
                  vae_decode_flops=vae_flops)
    rows, images = [header], {}
    print(json.dumps(header), flush=True)
    s = Settings(steps=50, cfg=7.5, width=512, height=512)
    c = Components(unet=unet, vae=vae, text_encoder=text, tokenizer=None, scheduler_config=SCHED,
                   schedule=schedule_from_config(SCHED), name="sd15-shaped-random", device=dev, dtype=dtype)

    def ours(bs, init=None):
        gens = pipeline.generators(list(range(bs)))
        if init is None:
            x = pipeline.randn_like_each((bs, 4, 64, 64), gens, c)
            return pipeline.denoise(c, x, emb.expand(bs, -1, -1), neg.expand(bs, -1, -1), gens, s)
        s2 = Settings(steps=50, cfg=7.5, width=512, height=512, strength=0.75)
        start = pipeline.img2img_start(50, 0.75)
        from ldm_cli.models import encode_image
        from ldm_cli.sampling import add_noise

        x0 = torch.cat([encode_image(c, init, g) for g in gens])
        eps = pipeline.randn_like_each(x0.shape, gens, c)
        t0 = pipeline.ddim_timesteps(c.schedule, 50)[start]
        x_t = add_noise(x0, eps, c.schedule.alpha_bar[t0])
        return pipeline.denoise(c, x_t, emb.expand(bs, -1, -1), neg.expand(bs, -1, -1), gens, s2, start)

    def record(label, bs, fn, kind="txt2img", first_call_s=None):
        torch.cuda.reset_peak_memory_stats()
        med, out = timed(fn, args.reps)
        steps = 50 if kind == "txt2img" else 37
        mfu = (steps * unet_flops_b2 * bs + vae_flops * bs) / med / PEAK
        row = dict(label=label, kind=kind, batch=bs, s_per_call=round(med, 4), s_per_image=round(med / bs, 4),
                   images_per_s=round(bs / med, 3), unet_it_per_s=round(steps / med, 2), mfu_vs_989T=round(mfu, 4),
                   peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), first_call_s=first_call_s)
        images[(label, kind, bs)] = out.float().cpu()
        rows.append(row)
        print(json.dumps(row), flush=True)

    batches = [int(b) for b in args.batches.split(",")]
    init = torch.rand(1, 3, 512, 512, device=dev, dtype=dtype) * 2 - 1
    for mode in args.modes.split(","):
        if mode == "diffusers":
            from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

            pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet,
                                           scheduler=DDIMScheduler.from_config(SCHED), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)
            for bs in batches:
                gens = lambda: [torch.Generator("cpu").manual_seed(i) for i in range(bs)]  # noqa: E731
                record("diffusers default", bs, lambda: pipe(
                    prompt_embeds=emb.expand(bs, -1, -1), negative_prompt_embeds=neg.expand(bs, -1, -1),
                    num_inference_steps=50, guidance_scale=7.5, generator=gens(), output_type="pt").images)
            if args.img2img:
                i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
                i2i.set_progress_bar_config(disable=True)
                record("diffusers default", 1, lambda: i2i(
                    prompt_embeds=emb, negative_prompt_embeds=neg, image=(init + 1) / 2, strength=0.75,
                    num_inference_steps=50, guidance_scale=7.5, generator=[torch.Generator("cpu").manual_seed(0)],
                    output_type="pt").images, kind="img2img")
            continue
        if mode == "diffusers-compile":  # the anchor: ../shared/reference/anchor_diffusers.py's best setting
            from diffusers import DDIMScheduler, StableDiffusionPipeline

            unet.to(memory_format=torch.channels_last)
            vae.to(memory_format=torch.channels_last)
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet,
                                           scheduler=DDIMScheduler.from_config(SCHED), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)
            pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
            pipe.vae.decode = torch.compile(vae.decode, mode="reduce-overhead", fullgraph=True)
            for bs in batches:
                gens = lambda: [torch.Generator("cpu").manual_seed(i) for i in range(bs)]  # noqa: E731
                run = lambda: pipe(  # noqa: E731
                    prompt_embeds=emb.expand(bs, -1, -1), negative_prompt_embeds=neg.expand(bs, -1, -1),
                    num_inference_steps=50, guidance_scale=7.5, generator=gens(), output_type="pt").images.clone()
                t1 = time.perf_counter()
                run()
                torch.cuda.synchronize()
                record("diffusers channels_last + compile reduce-overhead", bs, run,
                       first_call_s=round(time.perf_counter() - t1, 1))
            del vae.decode  # ours must not run diffusers' compiled decode
            unet.to(memory_format=torch.contiguous_format)
            vae.to(memory_format=torch.contiguous_format)
            continue
        t0 = time.perf_counter()
        mode, _, variant = mode.partition("+")
        layout = True if mode.endswith("-nhwc") else False if mode.endswith("-nchw") else None
        if variant in ("fp8lin", "fp8all"):  # weights rounded in place: run these modes last
            simulate_fp8(unet, (torch.nn.Linear,) if variant == "fp8lin" else (torch.nn.Linear, torch.nn.Conv2d))
        torch.backends.cuda.matmul.allow_fp16_accumulation = variant == "fp16acc"
        accelerate(c, mode.removesuffix("-nhwc").removesuffix("-nchw"), channels_last=layout)
        mode += f"+{variant}" if variant else ""
        for bs in batches:
            t1 = time.perf_counter()
            ours(bs)
            torch.cuda.synchronize()
            first = round(time.perf_counter() - t1 + (t1 - t0 if bs == batches[0] else 0), 1)
            record(f"ldm {mode}", bs, lambda: ours(bs), first_call_s=first)
        if args.img2img:
            record(f"ldm {mode}", 1, lambda: ours(1, init), kind="img2img")
    # agreement with diffusers (fp16: kernels and fusion differ, so not bitwise)
    ref = {k: v for k, v in images.items() if k[0] == "diffusers default"}
    for (label, kind, bs), img in images.items():
        if label != "diffusers default" and ("diffusers default", kind, bs) in ref:
            d = (img - ref[("diffusers default", kind, bs)]).abs()
            row = dict(agreement=label, kind=kind, batch=bs, max_abs=round(d.max().item(), 4),
                       mean_abs=round(d.mean().item(), 5))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print_table(("setting", "kind", "batch", "s/image", "images/s", "U-Net it/s", "MFU", "peak GiB", "first call s"), rows,
                lambda r: [r["label"], r["kind"], r["batch"], r["s_per_image"], r["images_per_s"], r["unet_it_per_s"],
                           f"{r['mfu_vs_989T']:.1%}", r["peak_mem_gib"], r["first_call_s"]] if "label" in r else None)
    save_jsonl(f"gpu_sample-{args.modes.replace(',', '-').replace('+', '_')}.jsonl", rows, mode="w")


if __name__ == "__main__":
    main()
