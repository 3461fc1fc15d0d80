"""VAE tiling: peak GPU memory and time at 1024x1024 and 512x512 with tiled decode off / on / auto,
ldm's and diffusers' on the same SD-1.5-shaped random weights (fp16, 50 DDIM steps, cfg 7.5, batch 1),
with the agreement of each ldm image with diffusers' at the same tiling.

    python bench/vae_tiling.py
"""

import argparse
from dataclasses import replace


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1024,512", help="comma-separated square image sizes")
    from common import add_out_option

    add_out_option(ap)
    args = ap.parse_args()
    import torch
    from common import SCHED, Report, components, out_folder, sd15_shaped, timed
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ldm_cli import runtime
    from ldm_cli.accel import build_runner
    from ldm_cli.jobs import Settings
    from ldm_cli.sample import pipeline

    runtime.setup()
    runtime.configure_torch("graphs")
    dev, dtype = torch.device("cuda"), torch.float16
    unet, vae, text = sd15_shaped(dev, dtype)
    with torch.no_grad():
        emb = text(torch.randint(0, 49408, (1, 77), device=dev))[0]
        neg = text(torch.randint(0, 49408, (1, 77), device=dev))[0]
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler.from_config(SCHED), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    report, images = Report(out_folder(args.out), "vae_tiling"), {}
    sizes = [int(s) for s in args.sizes.split(",")]

    def record(label, size, tiling, fn):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        med, out = timed(fn, 2)
        images[(label, size, tiling)] = out.float().cpu()
        report.emit(dict(label=label, size=size, vae_tiling=tiling, s_per_image=round(med, 3),
                         peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2)))

    for size in sizes:
        for tiling in ("off", "on"):
            (pipe.vae.enable_tiling if tiling == "on" else pipe.vae.disable_tiling)()
            record("diffusers default", size, tiling, lambda: pipe(
                prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=50, guidance_scale=7.5,
                height=size, width=size, generator=torch.Generator("cpu").manual_seed(0), output_type="pt").images)
    pipe.vae.disable_tiling()
    c = components(unet, vae, text)
    unet_runner = build_runner(c, "graphs")

    def ours(size, tiling):
        s = Settings(steps=50, cfg=7.5, width=size, height=size)
        return pipeline.txt2img_from(replace(c, vae_tiling=tiling), emb, neg, [0], s, unet=unet_runner)

    for size in sizes:
        for tiling in ("off", "on", "auto"):
            record("ldm graphs", size, tiling, lambda: ours(size, tiling))
    for (label, size, tiling), img in images.items():
        ref = images.get(("diffusers default", size, "off" if tiling == "auto" else tiling))  # auto: <= 1024 px
        if label != "diffusers default" and ref is not None:
            d = (img - ref).abs()
            report.emit(dict(agreement=label, size=size, vae_tiling=tiling, max_abs=round(d.max().item(), 4),
                             mean_abs=round(d.mean().item(), 5)))
    report.table(("setting", "size", "--vae-tiling", "s/image", "peak GiB"),
                 lambda r: [r["label"], r["size"], r["vae_tiling"], r["s_per_image"], r["peak_mem_gib"]]
                 if "label" in r else None)
    report.save()


if __name__ == "__main__":
    main()
