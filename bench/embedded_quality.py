"""Quality of the embedded model, scored by its own CLIP image tower.

    python bench/embedded_quality.py .data/emoji.npz [--train 500] [--cfgs 1,3,5,7.5] [--steps 50]

Prompts: `--train` captions of training emoji and every held-out emoji (names never trained on), each
"NAME, STYLE style, on a COLOUR background". For each prompt, the real image (the emoji composed on
that background) and one generated image per cfg. Scores:
  - caption retrieval: in groups of 100, does an image's CLIP embedding rank its own caption first
    (top-1) or among the first five (top-5)? Real images give the ceiling.
  - Frechet distance between CLIP image features of generated and real images (FID's formula on the
    project's CLIP tower instead of Inception), per cfg.
Prints JSON lines and a table; run on the GPU (2,900 images at 64 px take under a minute there).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "recipes" / "tiny-emoji"))

from common import Report, add_out_option, out_folder  # noqa: E402
from emoji_data import BG_NAMES, caption, compose, load  # noqa: E402

from ldm_cli.jobs import Settings  # noqa: E402
from ldm_cli.models.defaults import EMBEDDED_MODEL  # noqa: E402
from ldm_cli.models.options import LoadOptions  # noqa: E402
from ldm_cli.sample import pipeline  # noqa: E402
from ldm_cli.sample.run import load as load_model  # noqa: E402


def clip_tower(folder: Path, device):
    from safetensors.torch import load_file
    from transformers import CLIPVisionModelWithProjection

    vision = CLIPVisionModelWithProjection.from_pretrained(folder / "clip_image_tower").to(device, torch.float32).eval()
    proj = load_file(folder / "clip_image_tower" / "text_projection.safetensors")["weight"].to(device, torch.float32)
    return vision, proj


@torch.no_grad()
def image_features(vision, pixels: torch.Tensor) -> torch.Tensor:
    """pixels in [-1, 1] -> unit-norm CLIP image embeddings."""
    return torch.nn.functional.normalize(vision(pixel_values=pixels.float()).image_embeds, dim=-1)


@torch.no_grad()
def text_features(c, proj, captions: list[str]) -> torch.Tensor:
    tok = c.tokenizer(captions, padding="max_length", max_length=c.tokenizer.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(c.device)
    pooled = c.text_encoder(tok).pooler_output.float()
    return torch.nn.functional.normalize(pooled @ proj.T, dim=-1)


def retrieval(img: torch.Tensor, txt: torch.Tensor, group: int = 100) -> tuple[float, float]:
    top1 = top5 = n = 0
    for s in range(0, len(img) - group + 1, group):
        sim = img[s:s + group] @ txt[s:s + group].T
        rank = (sim > sim.diagonal()[:, None]).sum(1)
        top1 += (rank < 1).sum().item()
        top5 += (rank < 5).sum().item()
        n += group
    return top1 / n, top5 / n


@torch.no_grad()
def name_retrieval(c, proj, img: torch.Tensor, names, styles, bgs, group: int = 100) -> tuple[float, float]:
    """As `retrieval`, but image i's 100 candidates are its own style and background with each name of
    its group: only the emoji itself can pick the right caption."""
    top1 = top5 = n = 0
    for s in range(0, len(img) - group + 1, group):
        for i in range(s, s + group):
            txt = text_features(c, proj, [caption(names[j], styles[i], BG_NAMES[bgs[i]]) for j in range(s, s + group)])
            sim = txt @ img[i]
            rank = (sim > sim[i - s]).sum().item()
            top1 += rank < 1
            top5 += rank < 5
            n += 1
    return top1 / n, top5 / n


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) (Heusel et al. 2017, eq. 6)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    root = torch.linalg.eigvals(s_a @ s_b).real.clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * root).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("npz", type=Path, help="the emoji dataset (recipes/tiny-emoji/make_dataset.py makes it)")
    ap.add_argument("--train", type=int, default=500, help="training prompts scored")
    ap.add_argument("--cfgs", default="1,3,5,7.5", help="comma-separated guidance scales")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps")
    ap.add_argument("--batch", type=int, default=128, help="images per batch")
    ap.add_argument("--model", default=str(EMBEDDED_MODEL), help="model folder (default: the embedded model)")
    add_out_option(ap)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    c = load_model(LoadOptions(model=args.model, device=device, dtype="fp32", accel="none")).components
    report = Report(out_folder(args.out), "embedded_quality")
    vision, proj = clip_tower(Path(args.model), c.device)
    d = load(args.npz)
    rng = np.random.default_rng(0)
    train = rng.choice(np.flatnonzero(~d["held_out"]), args.train, replace=False)
    held = np.flatnonzero(d["held_out"])
    held = held[:len(held) // 100 * 100]  # whole groups of 100
    results = report.rows
    for split, idx in (("train", train), ("held_out", held)):
        bgs = rng.integers(0, len(BG_NAMES), len(idx))
        caps = [caption(d["name"][i], d["style"][i], BG_NAMES[b]) for i, b in zip(idx, bgs)]
        txt = text_features(c, proj, caps)
        real = image_features(vision, compose(torch.from_numpy(d["rgba"][idx]).to(c.device),
                                              torch.from_numpy(bgs).to(c.device)))
        r1, r5 = retrieval(real, txt)
        names, styles = d["name"][idx], d["style"][idx]
        n1, n5 = name_retrieval(c, proj, real, names, styles, bgs)
        report.emit({"split": split, "images": "real", "prompts": len(idx), "top1": r1, "top5": r5,
                     "name_top1": n1, "name_top5": n5})
        for cfg in map(float, args.cfgs.split(",")):
            t0 = time.perf_counter()
            feats = []
            for s in range(0, len(caps), args.batch):
                chunk = caps[s:s + args.batch]
                pics = pipeline.txt2img(c, chunk, [""] * len(chunk), list(range(s, s + len(chunk))),
                                        Settings(steps=args.steps, cfg=cfg, width=64, height=64))
                feats.append(image_features(vision, pics * 2 - 1))
            gen = torch.cat(feats)
            g1, g5 = retrieval(gen, txt)
            m1, m5 = name_retrieval(c, proj, gen, names, styles, bgs)
            report.emit({"split": split, "images": f"cfg {cfg:g}", "prompts": len(idx), "top1": g1, "top5": g5,
                            "top5_vs_real": g5 / r5 if r5 else None, "name_top1": m1, "name_top5": m5,
                            "name_top5_vs_real": m5 / n5 if n5 else None, "frechet_clip": frechet(gen, real),
                         "seconds": round(time.perf_counter() - t0, 1)})
    print("| split | images | prompts | caption top-1 | top-5 | top-5 / real | name top-1 | name top-5 | "
          "name top-5 / real | Frechet (CLIP) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "split" not in r:
            continue

        def pct(key):
            return f"{100 * r[key]:.0f}%" if r.get(key) is not None else "-"
        fd = f"{r['frechet_clip']:.4f}" if "frechet_clip" in r else "-"
        print(f"| {r['split']} | {r['images']} | {r['prompts']} | {pct('top1')} | {pct('top5')} | {pct('top5_vs_real')} | "
              f"{pct('name_top1')} | {pct('name_top5')} | {pct('name_top5_vs_real')} | {fd} |")
    report.save()


if __name__ == "__main__":
    main()
