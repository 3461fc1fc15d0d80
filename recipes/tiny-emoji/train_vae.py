"""Train the embedded model's VAE: an AutoencoderKL, 64x64x3 <-> 16x16x4 latents (factor 4).

    python train_vae.py emoji.npz OUT_DIR [--steps 3000]

Loss: L1 + MSE on pixels + a small KL term (Kingma & Welling 2014) that keeps the latent near N(0, I).
Reports PSNR on held-out emoji names, and sets scaling_factor = 1 / std(latents) as SD does.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from emoji_data import BG_NAMES, compose, load, load_scenes

VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(64, 128, 128), layers_per_block=1,
                  latent_channels=4, norm_num_groups=32, sample_size=64)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss((a.clamp(-1, 1) + 1) / 2, (b + 1) / 2).item()
    return 10 * math.log10(1 / mse)


def main():
    from diffusers import AutoencoderKL

    ap = argparse.ArgumentParser()
    ap.add_argument("npz", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--max-seconds", type=float, default=float("inf"), help="stop early after this long")
    ap.add_argument("--scenes", type=Path, help="a scenes.py folder: half of each batch from its pictures")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    d = load(args.npz)
    rgba = torch.from_numpy(d["rgba"]).to(dev)
    held = torch.from_numpy(d["held_out"]).to(dev)
    train_idx, test_idx = (~held).nonzero()[:, 0], held.nonzero()[:, 0]
    scenes = load_scenes(args.scenes, dev)[0] if args.scenes else None
    vae = AutoencoderKL(**VAE_CONFIG).to(dev).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.05)
    t0 = time.time()
    for step in range(args.steps):
        idx = train_idx[torch.randint(len(train_idx), (args.batch,), device=dev)]
        x = compose(rgba[idx], torch.randint(len(BG_NAMES), (args.batch,), device=dev))
        if scenes is not None:
            x[::2] = scenes[torch.randint(len(scenes), (len(x[::2]),), device=dev)]
        with torch.autocast(dev, torch.bfloat16, enabled=dev == "cuda"):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample.float()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if time.time() - t0 > args.max_seconds:
            print(f"stopping at step {step}: --max-seconds reached", flush=True)
            args.steps = step + 1
            break
        if step % 500 == 0 or step == args.steps - 1:
            print(f"vae step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    vae.eval()
    with torch.no_grad():
        bg = torch.arange(len(test_idx), device=dev) % len(BG_NAMES)
        x = compose(rgba[test_idx], bg)
        z = vae.encode(x).latent_dist.mode()
        held_psnr = psnr(vae.decode(z).sample, x)
        idx = train_idx[:2000]
        xt = compose(rgba[idx], torch.arange(len(idx), device=dev) % len(BG_NAMES))
        zt = vae.encode(xt).latent_dist.mode()
        train_psnr = psnr(vae.decode(zt).sample, xt)
        scale = 1 / zt.float().std().item()
    vae.register_to_config(scaling_factor=scale)
    vae.save_pretrained(args.out)
    scene_psnr = None
    if scenes is not None:  # on 500 of the scene pictures it trained on (fresh ones look alike)
        with torch.no_grad():
            xs = scenes[-500:]
            scene_psnr = round(psnr(vae.decode(vae.encode(xs).latent_dist.mode()).sample, xs), 2)
    metrics = {"psnr_scenes_db": scene_psnr,
               "vae_params_m": sum(p.numel() for p in vae.parameters()) / 1e6, "psnr_held_out_db": round(held_psnr, 2),
               "psnr_train_db": round(train_psnr, 2), "scaling_factor": scale, "steps": args.steps,
               "seconds": round(time.time() - t0, 1)}
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
