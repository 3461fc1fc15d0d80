"""Train the embedded model's text encoder as one half of a small CLIP (Radford et al. 2021).

    python train_clip.py emoji.npz TOKENIZER_DIR OUT_DIR [--steps 4000]

A transformers CLIPModel (text and image towers, 3 layers each) learns with the symmetric contrastive
loss on (composed emoji, caption) pairs. Saved: OUT/text_encoder (CLIPTextModel, what the U-Net
conditions on) and OUT/image_encoder (CLIPVisionModelWithProjection + the text projection, the
scorer of bench/embedded_quality.py). Reports image->caption retrieval among 100 captions.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from emoji_data import BG_NAMES, caption, compose, load, load_scenes

TEXT = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=32, projection_dim=256)
VISION = dict(image_size=64, patch_size=8, hidden_size=256, intermediate_size=1024, num_hidden_layers=3,
              num_attention_heads=4, projection_dim=256)


def tokenize_all(tok, d, dev) -> torch.Tensor:
    """Token ids of every (image, background) caption: [N, backgrounds, max_len]."""
    caps = [caption(n, s, b) for n, s in zip(d["name"], d["style"]) for b in BG_NAMES]
    ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    return ids.input_ids.reshape(len(d["name"]), len(BG_NAMES), -1).to(dev)


@torch.no_grad()
def retrieval(model, rgba, ids, idx, dev) -> dict:
    """Image->caption top-1/top-5 among the captions of 100 images (each on its own background)."""
    idx = idx[:100]
    bg = torch.arange(len(idx), device=dev) % len(BG_NAMES)
    img = model.get_image_features(pixel_values=compose(rgba[idx], bg))
    txt = model.get_text_features(input_ids=ids[idx, bg])
    img, txt = [getattr(t, "pooler_output", t) for t in (img, txt)]
    sim = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T
    rank = (sim > sim.diagonal()[:, None]).sum(1)  # how many captions beat the right one
    return {"top1": (rank < 1).float().mean().item(), "top5": (rank < 5).float().mean().item()}


def main():
    from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    ap = argparse.ArgumentParser()
    ap.add_argument("npz", type=Path)
    ap.add_argument("tokenizer", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--max-seconds", type=float, default=float("inf"), help="stop early after this long")
    ap.add_argument("--scenes", type=Path, help="a scenes.py folder: half of each batch from its (picture, caption)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(args.tokenizer)
    d = load(args.npz)
    rgba = torch.from_numpy(d["rgba"]).to(dev)
    ids = tokenize_all(tok, d, dev)
    held = torch.from_numpy(d["held_out"]).to(dev)
    train_idx, test_idx = (~held).nonzero()[:, 0], held.nonzero()[:, 0]
    special = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id)
    config = CLIPConfig(text_config={**TEXT, **special}, vision_config=VISION, projection_dim=256)
    model = CLIPModel(config).to(dev).train()
    scene_pix = scene_ids = None
    if args.scenes:
        scene_pix, captions = load_scenes(args.scenes, dev)
        scene_ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.05)
    t0 = time.time()
    for step in range(args.steps):
        idx = train_idx[torch.randperm(len(train_idx), device=dev)[:args.batch]]
        bg = torch.randint(len(BG_NAMES), (len(idx),), device=dev)
        input_ids, pixels = ids[idx, bg], compose(rgba[idx], bg)
        if scene_pix is not None:
            pick = torch.randint(len(scene_pix), (len(idx) // 2,), device=dev)
            input_ids, pixels = torch.cat([input_ids[len(pick):], scene_ids[pick]]), torch.cat([pixels[len(pick):],
                                                                                                scene_pix[pick]])
        with torch.autocast(dev, torch.bfloat16, enabled=dev == "cuda"):
            loss = model(input_ids=input_ids, pixel_values=pixels, return_loss=True).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if time.time() - t0 > args.max_seconds:
            print(f"stopping at step {step}: --max-seconds reached", flush=True)
            args.steps = step + 1
            break
        if step % 500 == 0 or step == args.steps - 1:
            print(f"clip step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    model.eval()
    g = torch.Generator(device="cpu").manual_seed(0)
    metrics = {"held_out": retrieval(model, rgba, ids, test_idx, dev),
               "train": retrieval(model, rgba, ids, train_idx[torch.randperm(len(train_idx), generator=g)
                                                              .to(dev)], dev),
               "steps": args.steps, "seconds": round(time.time() - t0, 1)}
    text = CLIPTextModel(config.text_config)
    getattr(text, "text_model", text).load_state_dict(model.text_model.state_dict())  # transformers 4 and 5
    text.save_pretrained(args.out / "text_encoder")
    vision = CLIPVisionModelWithProjection(config.vision_config)
    vision.vision_model.load_state_dict(model.vision_model.state_dict())
    vision.visual_projection.load_state_dict(model.visual_projection.state_dict())
    vision.save_pretrained(args.out / "image_encoder")
    from safetensors.torch import save_file

    save_file({"weight": model.text_projection.weight.detach().cpu().contiguous()},
              args.out / "image_encoder" / "text_projection.safetensors")
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
