"""Does the embedded model draw what a plain-English prompt says? Scored by an independent judge.

    python bench/embedded_judge.py .data/emoji.npz [--judge .data/judge.pt] [--cfgs 1,7.5] [--model FOLDER]

The judge (recipes/tiny-emoji/judge.py) is a small CNN trained only on real composed scenes; it shares no
weights with the model (trained here first if --judge does not exist). Prompts: 200 combinations never in
the training data (recipes/tiny-emoji/scenes.py `held_out_prompts`: 120 "a WEARER wearing an ACCESSORY" in
many phrasings, 80 "A next to B" / "A on the left and B on the right"). Scores, per cfg:
  - pass rate: the share of images where the judge finds the thing and the accessory (or both things, in
    the stated order), with its 95% interval; the same for the real composed image of each prompt is the
    ceiling, and the real image encoded and decoded by the model's VAE the ceiling its U-Net can reach (a
    small accessory the VAE loses is lost to every sample); and each part on its own (wearer, accessory; a
    pair's first and second thing): where the misses are;
  - --trained: combinations the training data has instead (same phrasings): what is memory, what composition;
  - seed diversity: mean absolute pixel difference (0-255) between 4 seeds of one prompt, over the first 20
    prompts, against 4 real pictures of the same content (style, place, size, background vary as in the data).
Prints JSON lines and a table (64 px, 50 DDIM steps unless --sampler/--steps say, guidance at every step unless
--guidance-interval says; CPU: minutes).
"""

import argparse
import itertools
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent.parent / "recipes" / "tiny-emoji"))

import judge as judges  # noqa: E402
from common import Report, add_out_option, out_folder  # noqa: E402
from scenes import ACCESSORIES, Composer, Emoji, held_out, held_out_prompts  # noqa: E402

from ldm_cli.jobs import Settings  # noqa: E402
from ldm_cli.models.codecs import decode_latents, encode_image  # noqa: E402
from ldm_cli.models.defaults import EMBEDDED_MODEL  # noqa: E402
from ldm_cli.models.options import LoadOptions  # noqa: E402
from ldm_cli.sample import pipeline  # noqa: E402
from ldm_cli.sample.run import load as load_model  # noqa: E402


def generate(c, prompts: list[str], seeds: list[int], settings: Settings, batch: int) -> np.ndarray:
    """uint8 [N, 64, 64, 3] images, one per (prompt, seed)."""
    out = []
    for s in range(0, len(prompts), batch):
        pics = pipeline.txt2img(c, prompts[s:s + batch], [""] * len(prompts[s:s + batch]), seeds[s:s + batch],
                                settings)
        out.append((pics * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def through_vae(c, images: np.ndarray, batch: int = 100) -> np.ndarray:
    """The real images encoded and decoded by the model's VAE (uint8, same shape): the ceiling the U-Net can
    reach at best, since everything it draws is decoded by that VAE (a small accessory lost here is lost)."""
    out = []
    for s in range(0, len(images), batch):
        x = torch.from_numpy(images[s:s + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
        lat = torch.cat([encode_image(c, p[None], torch.Generator().manual_seed(0)) for p in x])
        pics = decode_latents(c, lat)
        out.append((pics * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def spread(groups: list[np.ndarray]) -> float:
    """Mean absolute pixel difference between the images of a group, averaged over groups (0-255)."""
    return float(np.mean([np.abs(g[i].astype(float) - g[j]).mean() for g in groups
                          for i, j in itertools.combinations(range(len(g)), 2)]))


def rates(ok: np.ndarray, kinds: list[str]) -> dict:
    out = {"all": round(float(ok.mean()), 3), "all_95": wilson(int(ok.sum()), len(ok))}
    for k in sorted(set(kinds)):
        out[k] = round(float(ok[[x == k for x in kinds]].mean()), 3)
    return out


def wilson(hits: int, n: int, z: float = 1.96) -> list[float]:
    """The 95% Wilson score interval of a pass rate of hits/n (one image per prompt: 200 images give about
    +-6 points at 28%), so two models' figures are compared with their noise in view."""
    p, d = hits / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(float(centre - half), 3), round(float(centre + half), 3)]


def parts(judge, scenes, images: np.ndarray) -> dict:
    """Which part of a prompt the images get right, each on its own: the wearer and the accessory of "wearing"
    prompts; a pair's first and second thing named (in its stated place, or either place when the prompt
    states no order): where the misses are; and of the accessories missed, the share where none is drawn and
    where another is, one that wearer was trained with (memory rather than composition) and one worn in the
    same place (head, eyes, neck, bow: the kind right, the item wrong); of the second things
    missed, the share where one thing alone is drawn and where the first is drawn twice."""
    p = judges.predict(judge, images)
    hit: dict[str, list[bool]] = {}
    for i, s in enumerate(scenes):
        t = judges.labels(s)
        if s.kind == "wearing":
            found = {"wearer": p["left"][i] == t["left"], "accessory": judges.accessory_ok(s, p["accessory"][i])}
            if not found["accessory"]:  # what is drawn instead: nothing, or an accessory that wearer was trained with
                drawn = judges.ACCS[p["accessory"][i]] if p["accessory"][i] < len(judges.ACCS) else None
                found["accessory missed: none drawn"] = drawn is None
                found["accessory missed: one trained with that wearer"] = drawn is not None and not held_out(
                    s.things[0], drawn)
                found["accessory missed: one worn in the same place"] = drawn is not None and (
                    ACCESSORIES[drawn][0] == ACCESSORIES[s.accessory][0])  # sunglasses for goggles, a cap for a crown
        else:
            seen = {p["left"][i], p["right"][i]}
            found = {"first thing": p["left"][i] == t["left"] if s.ordered else t["left"] in seen,
                     "second thing": p["right"][i] == t["right"] if s.ordered else t["right"] in seen}
            if not found["second thing"]:  # what is drawn instead: one thing alone, or the first thing twice
                found["second missed: one thing drawn"] = p["right"][i] == len(judges.THINGS)
                found["second missed: the first twice"] = p["left"][i] == p["right"][i] == t["left"]
        for name, ok in found.items():
            hit.setdefault(name, []).append(bool(ok))
    return {k: round(float(np.mean(v)), 3) for k, v in hit.items()}


def emphasised(caption: str, weight: float) -> str:
    """A "wearing" caption with its accessory phrase in A1111's emphasis, `(a top hat:1.3)`: the part the model
    most often drops, weighted up (the same caption when no accessory phrase is found)."""
    return re.sub(r" (wearing|with|in) ([^,]+)", lambda m: f" {m[1]} ({m[2]}:{weight:g})", caption, count=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("npz", type=Path, help="the emoji dataset (recipes/tiny-emoji/make_dataset.py makes it)")
    ap.add_argument("--judge", type=Path, default=Path(".data/judge.pt"), help="judge weights (trained if missing)")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--cfgs", default="1,7.5")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--sampler", default="ddim", help="any of ldm sample's --sampler names")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--guidance-interval", metavar="LO,HI", help="ldm sample's --guidance-interval (default: none)")
    ap.add_argument("--seeds", type=int, default=4, help="seeds per prompt for the diversity figure")
    ap.add_argument("--emphasis", type=float, default=1.0,
                    help="weight the accessory of \"wearing\" prompts, as a user would write (a hat:1.3); 1: as they are")
    ap.add_argument("--trained", action="store_true",
                    help="prompts of combinations the training data has (memory), not held-out ones (composition)")
    ap.add_argument("--model", default=str(EMBEDDED_MODEL), help="model folder (default: the embedded model)")
    add_out_option(ap)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    emoji = Emoji(args.npz)
    if not args.judge.is_file():
        torch.save(judges.train(emoji, 30000, 8).state_dict(), args.judge)
    judge = judges.load(args.judge)
    c = load_model(LoadOptions(model=args.model, device=device, dtype="fp32", accel="none")).components
    report = Report(out_folder(args.out), "embedded_judge")
    scenes = held_out_prompts(emoji, args.prompts, trained=args.trained)
    kinds = [s.kind for s in scenes]
    prompts = [emphasised(s.caption, args.emphasis) if s.kind == "wearing" and args.emphasis != 1 else s.caption
               for s in scenes]
    real = np.stack([s.image for s in scenes])
    which = "trained" if args.trained else "held-out"
    report.emit({"model": args.model, "combinations": which, "images": "real (ceiling)", "prompts": len(scenes),
                 "pass": rates(judges.passes(judge, scenes, real), kinds)})
    decoded = through_vae(c, real)
    report.emit({"images": "real through the VAE", "prompts": len(scenes),
                 "pass": rates(judges.passes(judge, scenes, decoded), kinds), "parts": parts(judge, scenes, decoded)})
    composer = Composer(emoji, seed=7, train=False)
    few = scenes[:20]
    real_groups = [np.stack([composer.again(s).image for _ in range(args.seeds)]) for s in few]
    report.emit({"images": "real", "seed_spread": round(spread(real_groups), 2), "prompts": len(few)})
    for cfg in map(float, args.cfgs.split(",")):
        t0 = time.perf_counter()
        settings = Settings(steps=args.steps, cfg=cfg, width=64, height=64, sampler=args.sampler,
                            guidance_interval=args.guidance_interval)
        gen = generate(c, prompts, list(range(len(prompts))), settings, args.batch)
        ok = judges.passes(judge, scenes, gen)
        many = generate(c, [s.caption for s in few for _ in range(args.seeds)], list(range(len(few) * args.seeds)),
                        settings, args.batch)
        groups = [many[i * args.seeds:(i + 1) * args.seeds] for i in range(len(few))]
        report.emit({"images": f"cfg {cfg:g}", "combinations": which, "sampler": f"{args.sampler} {args.steps}",
                     **({"guidance_interval": args.guidance_interval} if args.guidance_interval else {}),
                     "emphasis": args.emphasis, "prompts": len(scenes),
                     "pass": rates(ok, kinds), "parts": parts(judge, scenes, gen),
                     "seed_spread": round(spread(groups), 2), "seconds": round(time.perf_counter() - t0, 1)})
        if cfg == max(map(float, args.cfgs.split(","))):
            grid = np.concatenate([np.concatenate([real[i], gen[i]], 1) for i in range(min(16, len(real)))], 0)
            Image.fromarray(grid).save(out_folder(args.out) / "embedded_judge_examples.png")
    report.table(("images", "pass: all", "wearing", "pair", "seed spread (0-255)"),
                 lambda r: [r["images"], r.get("pass", {}).get("all", "-"), r.get("pass", {}).get("wearing", "-"),
                            r.get("pass", {}).get("pair", "-"), r.get("seed_spread", "-")] if "images" in r else None)
    report.save()


if __name__ == "__main__":
    main()
