"""Peak GPU memory and time at 1024x1024 (and 512x512) with and without tiled VAE decode, ours and
diffusers' on the same SD-1.5-shaped random weights (fp16, 50 DDIM steps, cfg 7.5, batch 1).

    python bench/gpu_tiled.py        # -> $OUT/gpu_tiled.jsonl
"""

import json
import os

import torch
from gpu_sample import SCHED, build, timed

from ldm_cli import pipeline
from ldm_cli.accel import accelerate
from ldm_cli.config import Settings
from ldm_cli.models import Components
from ldm_cli.schedule import schedule_from_config


def ours(c, size, emb, neg):
    s, gens = Settings(steps=50, cfg=7.5, width=size, height=size), pipeline.generators([0])
    x = pipeline.randn_like_each((1, 4, size // 8, size // 8), gens, c)
    return pipeline.denoise(c, x, emb, neg, gens, s)


def main():
    dev, dtype = torch.device("cuda"), torch.float16
    unet, vae, text = build(dev, dtype)
    with torch.no_grad():
        emb = text(torch.randint(0, 49408, (1, 77), device=dev))[0]
        neg = text(torch.randint(0, 49408, (1, 77), device=dev))[0]
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler.from_config(SCHED), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    c = Components(unet=unet, vae=vae, text_encoder=text, tokenizer=None, scheduler_config=SCHED,
                   schedule=schedule_from_config(SCHED), name="sd15-shaped-random", device=dev, dtype=dtype)
    rows, images = [], {}

    def record(label, size, tiling, fn):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        med, out = timed(fn, 2)
        images[(label, size, tiling)] = out.float().cpu()
        row = dict(label=label, size=size, vae_tiling=tiling, s_per_image=round(med, 3),
                   peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
        rows.append(row)
        print(json.dumps(row), flush=True)

    for size in (1024, 512):
        for tiling in ("off", "on"):
            (pipe.vae.enable_tiling if tiling == "on" else pipe.vae.disable_tiling)()
            record("diffusers default", size, tiling, lambda: pipe(
                prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=50, guidance_scale=7.5,
                height=size, width=size, generator=torch.Generator("cpu").manual_seed(0), output_type="pt").images)
    pipe.vae.disable_tiling()
    accelerate(c, "graphs")
    for size in (1024, 512):
        for tiling in ("off", "on", "auto"):
            c.vae_tiling = tiling
            record("ldm graphs", size, tiling, lambda: ours(c, size, emb, neg))
    for (label, size, tiling), img in images.items():
        ref = images.get(("diffusers default", size, "off" if tiling == "auto" else tiling))  # auto: <= 1024 px
        if label != "diffusers default" and ref is not None:
            d = (img - ref).abs()
            row = dict(agreement=label, size=size, vae_tiling=tiling, max_abs=round(d.max().item(), 4),
                       mean_abs=round(d.mean().item(), 5))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_tiled.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
