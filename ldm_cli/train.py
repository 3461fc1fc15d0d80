"""`ldm train`: fine-tune a U-Net (or train one from scratch) in a frozen VAE's latent space,
conditioned on a frozen text encoder. Read top to bottom: config, setup, the loop, saving.

Determinism: step k's data order, caption dropout and noise come from generators seeded with
(seed, k), so a run resumed from a checkpoint at step k continues exactly as the unbroken run.
"""

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm_cli import data
from ldm_cli.errors import LdmError, check
from ldm_cli.models import Components, encode_text, load_components, save_components
from ldm_cli.sampling import add_noise

UNET_PRESETS = {  # block widths, layers per block, attention head dim, norm groups
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
    "small": dict(block_out_channels=(64, 128, 256), layers_per_block=2, attention_head_dim=8, norm_num_groups=32,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
}


@dataclass(frozen=True)
class TrainConfig:
    data_dir: str
    model: str  # supplies the frozen VAE, text encoder, tokenizer, scheduler (and the U-Net to fine-tune)
    out_dir: str
    from_scratch: bool = False
    unet_config: str = "tiny"  # preset name or a UNet2DConditionModel config.json (with --from-scratch)
    resolution: int = 64
    batch_size: int = 4
    max_steps: int = 100
    lr: float = 1e-4
    lr_scheduler: str = "constant"  # any of diffusers.optimization's: constant, cosine, linear, ...
    warmup_steps: int = 0
    seed: int = 0
    mixed_precision: str = "no"  # no, fp16, bf16 (accelerate's names)
    gradient_accumulation: int = 1
    caption_dropout: float = 0.1  # train the unconditional branch too, so CFG works on the result
    random_flip: bool = False
    random_crop: bool = False
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    strict: bool = False
    device: str = "auto"


def build_unet(c: Components, preset: str, resolution: int):
    from diffusers import UNet2DConditionModel

    if preset in UNET_PRESETS:
        kw = dict(UNET_PRESETS[preset])
    else:
        path = Path(preset)
        check(path.is_file(), f"--unet-config {preset!r}: not a preset ({', '.join(UNET_PRESETS)}) or a file")
        kw = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    channels = c.vae.config.latent_channels
    kw.update(sample_size=resolution // c.vae_scale, in_channels=channels, out_channels=channels,
              cross_attention_dim=c.text_encoder.config.hidden_size)
    return UNet2DConditionModel(**kw)


def step_batch(examples, step: int, batch_size: int, seed: int) -> list:
    """The examples of global step `step`: epoch e is a permutation seeded by (seed, e)."""
    n = len(examples)
    out = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(i, n)
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(examples[order[pos]])
    return out


def diffusion_loss(unet, c: Components, latents, context, gen: torch.Generator):
    """DDPM's simple loss (Ho et al. eq. 14) with the model's prediction type: || target - net(x_t, t) ||^2."""
    noise = torch.randn(latents.shape, generator=gen).to(latents.device, latents.dtype)
    t_cpu = torch.randint(0, c.schedule.num_train_timesteps, (len(latents),), generator=gen)
    t = t_cpu.to(latents.device)
    alpha_bar = c.schedule.alpha_bar[t_cpu]  # indexed on the CPU: no device->host sync
    x_t = add_noise(latents, noise, alpha_bar)
    if c.schedule.prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1-a) x0
        a = alpha_bar.to(latents.device).reshape(-1, 1, 1, 1)
        target = a.sqrt() * noise - (1 - a).sqrt() * latents
    else:
        target = noise
    pred = unet(x_t, t, encoder_hidden_states=context, return_dict=False)[0]
    return F.mse_loss(pred.float(), target.float())


def save_checkpoint(unet, optimizer, lr_sched, step: int, cfg: TrainConfig, ckpt_root: Path) -> Path:
    """Atomic: write into a temp folder, then rename; keep the last `keep_checkpoints`."""
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp / "unet")
    torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_sched.state_dict(), "step": step},
               tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    os.replace(tmp, final) if not final.exists() else shutil.rmtree(tmp)
    for old in sorted(ckpt_root.glob("step-*"))[:-cfg.keep_checkpoints]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = sorted(p for p in ckpt_root.glob("step-*") if (p / "state.pt").is_file())
    return done[-1] if done else None


def train(cfg: TrainConfig, resume: str | None = None, on_step=None) -> Path:
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel
    from diffusers.optimization import get_scheduler

    check(cfg.max_steps >= 1, f"--max-steps must be >= 1, got {cfg.max_steps}")
    check(cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}")
    check(0 <= cfg.caption_dropout <= 1, f"--caption-dropout must be in [0, 1], got {cfg.caption_dropout}")
    check(math.isfinite(cfg.lr) and cfg.lr > 0, f"--lr must be a positive number, got {cfg.lr}")
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    examples, skipped = data.find_examples(cfg.data_dir, cfg.strict)  # bad data fails before anything is written
    ckpt_root.mkdir(parents=True, exist_ok=True)

    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation,
                              cpu=cfg.device == "cpu")
    c = load_components(cfg.model, device=str(accelerator.device.type), dtype="fp32")
    check(cfg.resolution % (8 * c.vae_scale) == 0 or cfg.resolution % 8 == 0,
          f"--resolution must be a multiple of 8, got {cfg.resolution}")
    torch.manual_seed(cfg.seed)  # from-scratch weights depend on the seed only
    unet = build_unet(c, cfg.unet_config, cfg.resolution) if cfg.from_scratch else c.unet
    start = 0
    resume_from = latest_checkpoint(ckpt_root) if resume == "latest" else (Path(resume) if resume else None)
    if resume == "latest" and resume_from is None:
        raise LdmError(f"--resume latest: no checkpoint in {ckpt_root}")
    if resume_from is not None:
        check((resume_from / "state.pt").is_file(), f"{resume_from}: not a complete checkpoint")
        unet = UNet2DConditionModel.from_pretrained(resume_from / "unet")
    unet.train().requires_grad_(True).to(accelerator.device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=1e-2)
    lr_sched = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                             num_training_steps=cfg.max_steps)
    if resume_from is not None:
        state = torch.load(resume_from / "state.pt", weights_only=True)  # tensors and numbers only: no code
        optimizer.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_scheduler"])
        start = state["step"]
    unet, optimizer, lr_sched = accelerator.prepare(unet, optimizer, lr_sched)

    log = open(out / "log.jsonl", "a")
    t_start = time.perf_counter()
    for step in range(start, cfg.max_steps):
        rng = random.Random(cfg.seed * 7919 + step)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        batch = step_batch(examples, step, cfg.batch_size, cfg.seed)
        pixels = torch.stack([data.load_pixels(e, cfg.resolution, rng, cfg.random_crop, cfg.random_flip)
                              for e in batch]).to(accelerator.device)
        captions = ["" if rng.random() < cfg.caption_dropout else e.caption for e in batch]
        with torch.no_grad():
            latents = c.vae.encode(pixels).latent_dist.sample(gen) * c.vae.config.scaling_factor
            context = encode_text(replace(c, device=accelerator.device), captions)
        with accelerator.accumulate(unet):
            loss = diffusion_loss(unet, c, latents, context, gen)
            accelerator.backward(loss)
            optimizer.step()
            lr_sched.step()
            optimizer.zero_grad()
        record = {"step": step + 1, "loss": loss.item(), "lr": lr_sched.get_last_lr()[0],
                  "elapsed_s": round(time.perf_counter() - t_start, 3)}
        log.write(json.dumps(record) + "\n")
        log.flush()
        if on_step is not None:
            on_step(record)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.max_steps:
            save_checkpoint(accelerator.unwrap_model(unet), optimizer, lr_sched, step + 1, cfg, ckpt_root)
    log.close()
    final = accelerator.unwrap_model(unet).eval()
    save_checkpoint(final, optimizer, lr_sched, cfg.max_steps, cfg, ckpt_root)
    model_dir = out / "model"
    tmp = out / f".tmp-model-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_components(replace(c, unet=final), tmp)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    os.replace(tmp, model_dir)
    if skipped:
        (out / "skipped.txt").write_text("\n".join(skipped) + "\n")
    return model_dir
