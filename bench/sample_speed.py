"""Sampling speed: ldm vs diffusers' StableDiffusionPipeline, side by side in one process, with the
agreement check (max / mean abs difference of the images on [0, 1] vs diffusers' default).

SD-1.5-shaped random weights (speed does not depend on values), fp16, 512x512, 50 DDIM steps, cfg 7.5,
the same CPU-generator seeds; text embeddings made once up front for both. Settings (--modes):
  diffusers           diffusers' default pipeline
  diffusers-compile   diffusers' best: channels_last + torch.compile(mode="reduce-overhead") of U-Net and VAE
  none / graphs / compile   ldm --accel none|graphs|compile (auto on CUDA is graphs)
MFU = (50 x U-Net FLOPs at batch 2 x batch + VAE decode FLOPs x batch) / time / 989 TFLOP/s.

    python bench/sample_speed.py                                   # diffusers,graphs at batch 1 and 8
    python bench/sample_speed.py --modes diffusers,diffusers-compile,compile --img2img
"""

import argparse
import time
from dataclasses import replace


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--modes", default="diffusers,graphs", help="comma-separated settings (see above)")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--reps", type=int, default=3, help="timed calls per setting (median reported)")
    ap.add_argument("--img2img", action="store_true", help="also time img2img at strength 0.75, batch 1")
    from common import add_out_option

    add_out_option(ap)
    return ap.parse_args()


def flops(unet, vae, emb, neg):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    dev, dtype = emb.device, emb.dtype
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        unet(torch.randn(2, 4, 64, 64, device=dev, dtype=dtype), torch.tensor([500, 500], device=dev),
             encoder_hidden_states=torch.cat([neg, emb]))
    unet_b2 = fc.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        vae.decode(torch.randn(1, 4, 64, 64, device=dev, dtype=dtype))
    return unet_b2, fc.get_total_flops()


def diffusers_runs(mode, unet, vae, text, emb, neg, init, args, record):
    import torch
    from common import SCHED
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    compiled = mode == "diffusers-compile"
    if compiled:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler.from_config(SCHED), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if compiled:
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
        pipe.vae.decode = torch.compile(vae.decode, mode="reduce-overhead", fullgraph=True)
    label = "diffusers channels_last + compile" if compiled else "diffusers default"
    for bs in [int(b) for b in args.batches.split(",")]:
        def run(bs=bs):
            gens = [torch.Generator("cpu").manual_seed(i) for i in range(bs)]
            return pipe(prompt_embeds=emb.expand(bs, -1, -1), negative_prompt_embeds=neg.expand(bs, -1, -1),
                        num_inference_steps=50, guidance_scale=7.5, generator=gens, output_type="pt").images.clone()
        t1 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        record(label, bs, run, first_call_s=round(time.perf_counter() - t1, 1))
    if args.img2img and not compiled:
        i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
        i2i.set_progress_bar_config(disable=True)
        record(label, 1, lambda: i2i(
            prompt_embeds=emb, negative_prompt_embeds=neg, image=(init + 1) / 2, strength=0.75,
            num_inference_steps=50, guidance_scale=7.5, generator=[torch.Generator("cpu").manual_seed(0)],
            output_type="pt").images, kind="img2img")
    if compiled:  # ldm's settings after this must not run diffusers' compiled decode or its layout
        del vae.decode
        unet.to(memory_format=torch.contiguous_format)
        vae.to(memory_format=torch.contiguous_format)


def ldm_runs(mode, c, emb, neg, init, args, record):
    import torch

    from ldm_cli.accel import build_runner
    from ldm_cli.jobs import Settings
    from ldm_cli.sample import pipeline

    t0 = time.perf_counter()
    unet = build_runner(c, mode)
    s = Settings(steps=50, cfg=7.5, width=512, height=512)

    def txt2img(bs):
        return pipeline.txt2img_from(c, emb.expand(bs, -1, -1), neg.expand(bs, -1, -1), list(range(bs)), s,
                                     unet=unet)

    def img2img():  # pipeline.img2img with the embeddings given (as diffusers gets them)
        return pipeline.img2img_from(c, [init], emb, neg, [0], replace(s, strength=0.75), unet=unet)

    for i, bs in enumerate(int(b) for b in args.batches.split(",")):
        t1 = time.perf_counter()
        txt2img(bs)
        torch.cuda.synchronize()
        first = round(time.perf_counter() - t1 + (t1 - t0 if i == 0 else 0), 1)
        record(f"ldm {mode}", bs, lambda bs=bs: txt2img(bs), first_call_s=first)
    if args.img2img:
        record(f"ldm {mode}", 1, img2img, kind="img2img")


def main():
    args = parse()
    import torch
    from common import PEAK_TFLOPS, Report, components, out_folder, sd15_shaped, timed

    from ldm_cli import runtime

    dev, dtype = torch.device("cuda"), torch.float16
    runtime.setup()
    runtime.configure_torch("compile" if "compile" in args.modes else "auto")
    torch._dynamo.config.cache_size_limit = 64  # diffusers' and ours compile the same U-Net code
    unet, vae, text = sd15_shaped(dev, dtype)
    with torch.no_grad():
        emb = text(torch.randint(0, 49408, (1, 77), device=dev))[0]
        neg = text(torch.randint(0, 49408, (1, 77), device=dev))[0]
    unet_b2, vae_flops = flops(unet, vae, emb, neg)
    report = Report(out_folder(args.out), "sample_speed")
    report.emit(dict(unet_flops_batch2=unet_b2, vae_decode_flops=vae_flops))
    images = {}
    init = torch.rand(1, 3, 512, 512, device=dev, dtype=dtype) * 2 - 1
    c = components(unet, vae, text)

    def record(label, bs, fn, kind="txt2img", first_call_s=None):
        torch.cuda.reset_peak_memory_stats()
        med, out = timed(fn, args.reps)
        steps = 50 if kind == "txt2img" else 37
        mfu = (steps * unet_b2 * bs + vae_flops * bs) / med / (PEAK_TFLOPS * 1e12)
        images[(label, kind, bs)] = out.float().cpu()
        report.emit(dict(label=label, kind=kind, batch=bs, s_per_image=round(med / bs, 4),
                         images_per_s=round(bs / med, 3), mfu=round(mfu, 4),
                         peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), first_call_s=first_call_s))

    for mode in args.modes.split(","):
        if mode.startswith("diffusers"):
            diffusers_runs(mode, unet, vae, text, emb, neg, init, args, record)
        else:
            ldm_runs(mode, c, emb, neg, init, args, record)
    for (label, kind, bs), img in images.items():  # fp16: kernels and fusion differ, so not bitwise
        ref = images.get(("diffusers default", kind, bs))
        if label != "diffusers default" and ref is not None:
            d = (img - ref).abs()
            report.emit(dict(agreement=label, kind=kind, batch=bs, max_abs=round(d.max().item(), 4),
                             mean_abs=round(d.mean().item(), 5)))
    report.table(("setting", "kind", "batch", "s/image", "images/s", "MFU", "peak GiB", "first call s"),
                 lambda r: [r["label"], r["kind"], r["batch"], r["s_per_image"], r["images_per_s"], f"{r['mfu']:.1%}",
                            r["peak_mem_gib"], r["first_call_s"]] if "label" in r else None)
    report.table(("agreement vs diffusers default", "kind", "batch", "max abs", "mean abs"),
                 lambda r: [r["agreement"], r["kind"], r["batch"], r["max_abs"], r["mean_abs"]] if "agreement" in r
                 else None)
    report.save()


if __name__ == "__main__":
    main()
