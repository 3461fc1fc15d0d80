"""SDXL sampling speed: ldm vs diffusers' StableDiffusionXLPipeline, side by side in one process, with the
agreement check (max / mean abs difference of the images on [0, 1] vs diffusers' default).

SDXL-base-shaped random weights (U-Net 2.57B parameters; speed does not depend on values), fp16 (the VAE
upcast to fp32, force_upcast, as both do), 1024x1024, 30 Euler steps (SDXL's default scheduler, leading
spacing), cfg 5, the same CPU-generator seeds; text conditioning (token states, pooled embedding) made
once, random, and given to both. Settings (--modes):
  diffusers           diffusers' default pipeline
  diffusers-compile   channels_last + torch.compile(mode="reduce-overhead") of the U-Net
  none / graphs / compile   ldm --accel none|graphs|compile (auto on CUDA is graphs)

    python bench/sdxl_speed.py                              # diffusers,graphs at batch 1 and 4
    python bench/sdxl_speed.py --modes diffusers,diffusers-compile,graphs,compile
    python bench/sdxl_speed.py --modes diffusers-compile,compile --batches 1 --profile   # GPU time by kernel kind
"""

import argparse
import time

STEPS, CFG, SIZE = 30, 5.0, 1024
SCHED = dict(_class_name="EulerDiscreteScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             steps_offset=1, timestep_spacing="leading", num_train_timesteps=1000, prediction_type="epsilon")


def sdxl_shaped(dev, dtype):
    """(unet, vae) shaped like SDXL base 1.0's, random weights, eval, no grad."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    unet.to(dev, dtype).eval().requires_grad_(False)
    vae.to(dev, dtype).eval().requires_grad_(False)
    return unet, vae


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--modes", default="diffusers,graphs")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="also where the GPU time of one call goes, by kernel kind")
    from common import Report, add_out_option, kernel_breakdown, out_folder, timed

    add_out_option(ap)
    args = ap.parse_args()
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from ldm_cli import runtime
    from ldm_cli.accel import build_runner
    from ldm_cli.diffusion.conditioning import AddedCond
    from ldm_cli.diffusion.schedule import schedule_from_config
    from ldm_cli.jobs import Settings
    from ldm_cli.models.components import Components
    from ldm_cli.sample import pipeline

    dev, dtype = torch.device("cuda"), torch.float16
    runtime.setup()
    runtime.configure_torch("compile" if "compile" in args.modes else "auto")
    unet, vae = sdxl_shaped(dev, dtype)
    g = torch.Generator("cpu").manual_seed(1)
    hidden, neg_hidden = (torch.randn(1, 77, 2048, generator=g).to(dev, dtype) for _ in range(2))
    pooled, neg_pooled = (torch.randn(1, 1280, generator=g).to(dev, dtype) for _ in range(2))
    report = Report(out_folder(args.out), "sdxl_speed")
    import copy

    # ours keeps the VAE in fp32 from load on (force_upcast); diffusers upcasts its fp16 one per call and back
    c = Components(unet=unet, vae=copy.deepcopy(vae).float(), text_encoder=None, tokenizer=None, scheduler_config=SCHED,
                   schedule=schedule_from_config(SCHED), name="sdxl-shaped-random", device=dev, dtype=dtype,
                   family="sdxl", force_zeros_for_empty_prompt=True)
    s = Settings(steps=STEPS, cfg=CFG, width=SIZE, height=SIZE, sampler="euler", negative="x")
    images = {}

    def record(label, bs, fn, first_call_s):
        torch.cuda.reset_peak_memory_stats()
        med, out = timed(fn, args.reps)
        images[(label, bs)] = out.float().cpu()
        report.emit(dict(label=label, batch=bs, s_per_image=round(med / bs, 4), images_per_s=round(bs / med, 3),
                         peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), first_call_s=first_call_s))

    for mode in args.modes.split(","):
        if mode.startswith("diffusers"):
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                             tokenizer_2=None, unet=unet,
                                             scheduler=EulerDiscreteScheduler.from_config(SCHED))
            pipe.set_progress_bar_config(disable=True)
            if mode == "diffusers-compile":
                pipe.unet.to(memory_format=torch.channels_last)
                pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
            label = "diffusers default" if mode == "diffusers" else "diffusers compiled"
            for bs in (int(b) for b in args.batches.split(",")):
                def run(bs=bs):
                    return pipe(prompt_embeds=hidden.expand(bs, -1, -1),
                                negative_prompt_embeds=neg_hidden.expand(bs, -1, -1),
                                pooled_prompt_embeds=pooled.expand(bs, -1),
                                negative_pooled_prompt_embeds=neg_pooled.expand(bs, -1),
                                num_inference_steps=STEPS, guidance_scale=CFG, height=SIZE, width=SIZE, output_type="pt",
                                generator=[torch.Generator("cpu").manual_seed(k) for k in range(bs)]).images
                t0 = time.perf_counter()
                run()
                torch.cuda.synchronize()
                record(label, bs, run, round(time.perf_counter() - t0, 1))
                if args.profile:
                    report.emit({"profile": label, "batch": bs, **kernel_breakdown(run)})
            if mode == "diffusers-compile":
                pipe.unet = pipe.unet._orig_mod.to(memory_format=torch.contiguous_format)
            continue
        runner = build_runner(c, mode)
        for bs in (int(b) for b in args.batches.split(",")):
            ids, neg_ids = (i.to(dev, dtype).expand(bs, -1) for i in pipeline.sdxl_time_ids(c, s))
            cond = AddedCond(hidden.expand(bs, -1, -1), pooled.expand(bs, -1), ids)
            uncond = AddedCond(neg_hidden.expand(bs, -1, -1), neg_pooled.expand(bs, -1), neg_ids)

            def run(cond=cond, uncond=uncond, bs=bs):
                return pipeline.txt2img_from(c, cond, uncond, list(range(bs)), s, unet=runner)
            t0 = time.perf_counter()
            run()
            torch.cuda.synchronize()
            record(f"ldm {mode}", bs, run, round(time.perf_counter() - t0, 1))
            if args.profile:
                report.emit({"profile": f"ldm {mode}", "batch": bs, **kernel_breakdown(run)})
    for (label, bs), img in images.items():
        ref = images.get(("diffusers default", bs))
        if label != "diffusers default" and ref is not None:
            d = (img - ref).abs()
            report.emit(dict(agreement=label, batch=bs, max_abs=round(d.max().item(), 4),
                             mean_abs=round(d.mean().item(), 5)))
    report.table(("setting", "batch", "s/image", "images/s", "peak GiB", "first call s"),
                 lambda r: [r["label"], r["batch"], r["s_per_image"], r["images_per_s"], r["peak_mem_gib"],
                            r["first_call_s"]] if "label" in r else None)
    report.table(("agreement vs diffusers default", "batch", "max abs", "mean abs"),
                 lambda r: [r["agreement"], r["batch"], r["max_abs"], r["mean_abs"]] if "agreement" in r else None)
    report.save()


if __name__ == "__main__":
    main()
