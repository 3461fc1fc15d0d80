"""Steps to quality: how many steps each sampler needs to make the picture a converged sampler makes.

    python bench/steps_to_quality.py [--model PATH] [--prompts 64] [--steps 5,8,10,15,20,25,30,50]
    python bench/steps_to_quality.py --samplers lms,lms:karras,euler:karras   # these beside DDIM only
    python bench/steps_to_quality.py --time ddim@50,dpm++2m:karras@15       # wall time per image only
    python bench/steps_to_quality.py --sd15 --time ddim@50,dpm++2m:karras@15  # the same, SD-1.5-sized (GPU)

For each prompt (seed k for prompt k, cfg 7.5, the model's native size) and each sampler / schedule and
step count: the RMS pixel distance (0-255) of the decoded image to a converged reference of the same seed,
averaged over the prompts. Two references, DDIM 250 steps and Heun 100 steps (199 U-Net calls): their
distance to each other says how converged "converged" is. Then, per sampler, the fewest steps at which it
is as close to the reference as DDIM at 50 steps is. The stochastic samplers (euler-a, dpm2-a, ddpm, the
DPM++ SDE ones, lcm) solve the SDE, not the ODE: for a seed they converge to another picture, so their
distance to an ODE reference stays large at any step count (that is not a defect; judge them by eye).

`--time` measures wall time per image (batch 1, after a warm-up) for sampler[:schedule]@steps entries
on this device, the embedded model (or --model) at its size, or with --sd15 an SD-1.5-shaped random model
at 512 px in fp16 (CUDA, --accel auto). `--plot` draws distance vs steps per sampler (Pillow).
"""

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import Report, add_out_option, components, out_folder, sd15_shaped

from ldm_cli.diffusion.names import SAMPLERS, SIGMA_SAMPLERS, STOCHASTIC
from ldm_cli.jobs import Settings
from ldm_cli.models.options import LoadOptions
from ldm_cli.sample import pipeline
from ldm_cli.sample.run import load as load_model

NAMES = ["cat face", "dog face", "red apple", "rocket", "sun", "tree", "fish", "car", "house", "guitar",
         "pizza", "rose", "ghost", "robot", "star", "umbrella"]
STYLES = ["3d", "flat", "cartoon"]
BACKGROUNDS = ["white", "blue", "black", "yellow", "green", "pink"]
CONFIGS = [(s, "default") for s in SAMPLERS] + [(s, "karras") for s in SIGMA_SAMPLERS] + [("dpm++2m", "exponential")]


def prompts(n: int) -> list[str]:
    return [f"{NAMES[i % len(NAMES)]}, {STYLES[i % 3]} style, on a {BACKGROUNDS[(i // 3) % 6]} background"
            for i in range(n)]


def label(sampler, schedule):
    return sampler if schedule == "default" else f"{sampler} {schedule}"


def make(c, texts, sampler, schedule, steps, batch=64):
    size = c.unet.config.sample_size * c.vae_scale
    s = Settings(steps=steps, cfg=7.5, width=size, height=size, sampler=sampler, schedule=schedule)
    out = []
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        with torch.no_grad():
            out.append(pipeline.txt2img(c, chunk, [""] * len(chunk), list(range(i, i + len(chunk))), s).float().cpu())
    return torch.cat(out)


def distance(a, b) -> float:
    """Mean over images of the RMS pixel difference, in 0-255 units."""
    return float(((a - b) ** 2).mean(dim=(1, 2, 3)).sqrt().mean() * 255)


def sweep(c, args, report):
    texts = prompts(args.prompts)
    t0 = time.perf_counter()
    refs = {"ddim 250": make(c, texts, "ddim", "default", 250), "heun 100": make(c, texts, "heun", "default", 100)}
    report.emit({"kind": "references", "ddim250_vs_heun100": round(distance(*refs.values()), 3),
                 "seconds": round(time.perf_counter() - t0, 1)})
    steps_list = [int(v) for v in args.steps.split(",")]
    configs = CONFIGS
    if args.samplers:  # DDIM always: the bar the others are measured against
        configs = [("ddim", "default")] + [(n, sch or "default") for n, _, sch in
                                           (e.partition(":") for e in args.samplers.split(",")) if n != "ddim"]
    for sampler, schedule in configs:
        for steps in steps_list:
            if sampler == "lcm" and steps > 50:
                continue
            images = make(c, texts, sampler, schedule, steps)
            calls = 2 * steps - 1 if sampler in ("heun", "dpm2", "dpm2-a") else steps
            report.emit({"kind": "distance", "sampler": label(sampler, schedule), "steps": steps, "unet_calls": calls,
                         **{f"to_{k.replace(' ', '')}": round(distance(images, r), 3) for k, r in refs.items()}})
    return summarize(report, steps_list)


def summarize(report, steps_list):
    rows = [r for r in report.rows if r.get("kind") == "distance"]
    summary, bar_steps = {}, 50 if 50 in steps_list else max(steps_list)
    for ref in ("to_ddim250", "to_heun100"):
        bar = next(r[ref] for r in rows if r["sampler"] == "ddim" and r["steps"] == bar_steps)
        for name in dict.fromkeys(r["sampler"] for r in rows):
            ok = [r["steps"] for r in rows if r["sampler"] == name and r[ref] <= bar]
            summary.setdefault(name, {})[ref] = min(ok) if ok else None
            summary[name]["bar_" + ref] = bar
    for name, v in summary.items():
        report.emit({"kind": "steps_to_ddim", "ddim_steps": bar_steps, "sampler": name, "vs_ddim250": v["to_ddim250"],
                     "vs_heun100": v["to_heun100"], "ddim_distance": [v["bar_to_ddim250"], v["bar_to_heun100"]]})
    return rows


def timing(c, spec: str, report, unet=None, emb=None):
    for entry in spec.split(","):
        name, steps = entry.split("@")
        sampler, _, schedule = name.partition(":")
        size = c.unet.config.sample_size * c.vae_scale
        s = Settings(steps=int(steps), cfg=7.5, width=size, height=size, sampler=sampler, schedule=schedule or "default")

        def one():
            with torch.no_grad():
                if emb is not None:
                    out = pipeline.txt2img_from(c, emb[0], emb[1], [0], s, unet=unet)
                else:
                    out = pipeline.txt2img(c, [prompts(1)[0]], [""], [0], s)
            if c.device.type == "cuda":
                torch.cuda.synchronize()
            return out

        one()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            one()
            times.append(time.perf_counter() - t0)
        report.emit({"kind": "time", "model": c.name, "device": str(c.device), "size": size, "sampler": name,
                     "steps": int(steps), "s_per_image": round(sorted(times)[1], 3)})


def plot(rows, path: Path, ref="to_heun100"):
    """Distance vs steps, one line per sampler (Pillow: no plotting library needed)."""
    from PIL import Image, ImageDraw

    w, h, left, bottom, top, right = 900, 560, 70, 50, 20, 190
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    xs = sorted({r["steps"] for r in rows})
    lo, hi = math.log10(0.5), math.log10(max(r[ref] for r in rows) * 1.2)  # log scale: 0.5 .. the largest
    px = lambda s: left + (w - left - right) * (s - xs[0]) / (xs[-1] - xs[0])  # noqa: E731
    py = lambda v: top + (h - top - bottom) * (1 - (math.log10(max(v, 0.5)) - lo) / (hi - lo))  # noqa: E731
    d.line([(left, top), (left, h - bottom), (w - right, h - bottom)], fill="black")
    for s in xs:
        d.text((px(s) - 6, h - bottom + 6), str(s), fill="black")
    for v in (0.5, 1, 2, 5, 10, 20, 50, 100, 200):
        if math.log10(v) <= hi:
            d.line([(left - 4, py(v)), (w - right, py(v))], fill="#e0e0e0")
            d.text((8, py(v) - 6), f"{v:g}", fill="black")
    d.text((left, h - 20), "steps", fill="black")
    d.text((left + 10, top), "RMS distance to the Heun-100 reference (0-255, log scale); lower is better", fill="black")
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf", "#000000", "#aa4400", "#0044aa", "#55aa00", "#aa0088", "#008888"]
    names = list(dict.fromkeys(r["sampler"] for r in rows))
    for i, name in enumerate(names):
        pts = [(px(r["steps"]), py(r[ref])) for r in rows if r["sampler"] == name]
        colour = palette[i % len(palette)]
        d.line(pts, fill=colour, width=2 if name.split()[0] not in STOCHASTIC else 1)
        d.text((w - right + 12, top + 16 * i), name, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--steps", default="5,8,10,15,20,25,30,50")
    ap.add_argument("--time", default=None, help="only time these: sampler[:schedule]@steps,...")
    ap.add_argument("--samplers", default=None, help="only these (and DDIM): sampler[:schedule],...")
    ap.add_argument("--sd15", action="store_true", help="with --time: an SD-1.5-shaped random model, 512 px, fp16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--plot", type=Path, default=None, help="write the distance plot here (PNG)")
    add_out_option(ap)
    args = ap.parse_args()
    report = Report(out_folder(args.out), "steps_to_quality" if args.time is None else "sampler_time")
    if args.sd15:
        from ldm_cli.accel import build_runner

        c = components(*sd15_shaped("cuda", torch.float16))
        emb = (torch.randn(1, 77, 768, device="cuda", dtype=torch.float16),
               torch.randn(1, 77, 768, device="cuda", dtype=torch.float16))
        timing(replace(c, name="sd15-shaped-random"), args.time, report, build_runner(c, "auto"), emb)
    else:
        c = load_model(LoadOptions(model=args.model, device=args.device, dtype="fp32", accel="none")).components
        if args.time:
            timing(c, args.time, report)
        else:
            rows = sweep(c, args, report)
            if args.plot:
                plot(rows, args.plot)
    report.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
