"""`ldm train`: fine-tune a U-Net (full or LoRA) or train one from scratch, in a frozen VAE's latent
space, conditioned on a frozen text encoder. Read top to bottom: config, helpers, the loop, saving.

Determinism: optimizer step k's examples, caption dropout and noise come from generators seeded by
(seed, k) (and the process rank), so a run resumed from the checkpoint of step k goes on exactly as
the unbroken run would have; no RNG state needs saving.
Processes: `accelerate launch -m ldm_cli train ...` (or `ldm train --gpus N`) runs one copy per GPU;
each step's global batch of batch_size x processes examples is split between them, and DDP averages
the gradients. One process gives the same numbers as a run without accelerate's launcher.
"""

import functools
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm_cli import checkpoints, data
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
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank instead of the whole U-Net
    lora_alpha: float = 0.0  # 0: same as the rank (scale 1)
    resolution: int = 64
    batch_size: int = 4  # per process
    max_steps: int = 100  # optimizer steps
    epochs: float = 0.0  # > 0: overrides max_steps with this many passes over the data
    lr: float = 1e-4
    lr_scheduler: str = "constant"  # any of diffusers.optimization's: constant, cosine, linear, ...
    warmup_steps: int = 0
    optimizer: str = "adamw"  # or adamw8bit (needs bitsandbytes)
    max_grad_norm: float = 1.0  # 0: no clipping
    seed: int = 0
    mixed_precision: str = "no"  # no, fp16, bf16 (accelerate's names)
    gradient_accumulation: int = 1  # micro-batches per optimizer step
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    compile: bool = False  # torch.compile the U-Net (through accelerate's dynamo_backend)
    caption_dropout: float = 0.1  # train the unconditional branch too, so CFG works on the result
    random_flip: bool = False
    random_crop: bool = False
    noise_offset: float = 0.0  # adds offset * N(0,1) per channel to the noise: helps very dark/bright images
    min_snr_gamma: float = 0.0  # > 0: Min-SNR-gamma loss weighting (Hang et al. 2023), 5 is typical
    ema: bool = False
    ema_decay: float = 0.9999
    cache: bool = True  # keep VAE latents and text embeddings on disk (off with random crop/flip)
    cache_dir: str = ""  # default: $LDM_CACHE_DIR/latents or ~/.cache/ldm/latents
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    validate_every: int = 0
    validation_prompts: tuple[str, ...] = ()
    validation_steps: int = 20
    log_every: int = 10  # losses stay on the device in between: no host sync every step
    strict: bool = False
    device: str = "auto"


def validate_config(cfg: TrainConfig) -> None:
    for name in ("batch_size", "gradient_accumulation", "keep_checkpoints", "log_every", "validation_steps"):
        check(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("max_steps", "checkpoint_every", "validate_every", "lora_rank", "warmup_steps"):
        check(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    check(cfg.max_steps >= 1 or cfg.epochs > 0, "--max-steps must be >= 1 (or give --epochs)")
    for name in ("lr", "epochs", "noise_offset", "min_snr_gamma", "lora_alpha", "max_grad_norm"):
        v = getattr(cfg, name)
        check(math.isfinite(v) and v >= 0, f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    check(cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    check(0 <= cfg.caption_dropout <= 1, f"--caption-dropout must be in [0, 1], got {cfg.caption_dropout}")
    check(0 < cfg.ema_decay < 1, f"--ema-decay must be in (0, 1), got {cfg.ema_decay}")
    check(cfg.mixed_precision in ("no", "fp16", "bf16"), f"--mixed-precision must be no, fp16 or bf16, "
          f"got {cfg.mixed_precision!r}")
    check(cfg.optimizer in ("adamw", "adamw8bit"), f"--optimizer must be adamw or adamw8bit, got {cfg.optimizer!r}")
    check(cfg.resolution >= 8 and cfg.resolution % 8 == 0, f"--resolution must be a multiple of 8, got {cfg.resolution}")
    check(not (cfg.lora_rank and cfg.from_scratch), "--lora-rank adapts an existing U-Net: drop --from-scratch")


# ---- helpers -----------------------------------------------------------------------------------------

def build_unet(c: Components, preset: str, resolution: int):
    from diffusers import UNet2DConditionModel

    if preset in UNET_PRESETS:
        kw = dict(UNET_PRESETS[preset])
    else:
        path = Path(preset)
        check(path.is_file(), f"--unet-config {preset!r}: not a preset ({', '.join(UNET_PRESETS)}) or a file")
        try:
            kw = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
        except (ValueError, UnicodeDecodeError) as e:
            raise LdmError(f"--unet-config {preset}: not a JSON config ({e})") from None
    channels = c.vae.config.latent_channels
    kw.update(sample_size=resolution // c.vae_scale, in_channels=channels, out_channels=channels,
              cross_attention_dim=c.text_encoder.config.hidden_size)
    try:
        return UNet2DConditionModel(**kw)
    except (TypeError, ValueError) as e:
        raise LdmError(f"--unet-config {preset}: not a valid UNet2DConditionModel config ({e})") from None


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def step_examples(examples, index: int, count: int, seed: int) -> list:
    """The `count` examples of batch `index`: epoch e visits the data in a permutation seeded by (seed, e)."""
    n = len(examples)
    return [examples[_epoch_order(n, seed, i // n)[i % n]] for i in range(index * count, (index + 1) * count)]


def sample_posterior(moments: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """z ~ N(mean, exp(logvar)) from the VAE encoder's output, as diffusers' DiagonalGaussianDistribution."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(moments).sample(gen)


def diffusion_loss(unet, c: Components, latents, context, gen: torch.Generator, noise_offset: float = 0.0,
                   min_snr_gamma: float = 0.0):
    """DDPM's simple loss (Ho et al. eq. 14) with the model's prediction type: || target - net(x_t, t) ||^2."""
    noise = torch.randn(latents.shape, generator=gen).to(latents.device, latents.dtype)
    if noise_offset:  # a per-channel constant shift lets the model learn to change overall brightness
        noise = noise + noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen).to(noise)
    t_cpu = torch.randint(0, c.schedule.num_train_timesteps, (len(latents),), generator=gen)
    alpha_bar = c.schedule.alpha_bar[t_cpu]  # indexed on the CPU: no device->host sync
    x_t = add_noise(latents, noise, alpha_bar)
    a = alpha_bar.to(latents.device).reshape(-1, 1, 1, 1)
    v_pred = c.schedule.prediction_type == "v_prediction"
    target = a.sqrt() * noise - (1 - a).sqrt() * latents if v_pred else noise  # v = sqrt(a) eps - sqrt(1-a) x0
    pred = unet(x_t, t_cpu.to(latents.device), encoder_hidden_states=context, return_dict=False)[0]
    per_item = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:  # weight min(SNR, gamma) / SNR on eps (/(SNR + 1) on v): tames the low-noise steps
        snr = alpha_bar / (1 - alpha_bar)
        weight = snr.clamp(max=min_snr_gamma) / (snr + 1 if v_pred else snr)
        per_item = per_item * weight.to(per_item.device)
    return per_item.mean()


@torch.no_grad()
def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * params, in place, one fused kernel per dtype."""
    torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1 - decay)


def ema_decay_at(step: int, decay: float) -> float:
    """Warm-up: average over roughly the steps so far until `decay` is reached (as diffusers' EMAModel)."""
    return min(decay, (1 + step) / (10 + step))


def cache_folder(cfg: TrainConfig, c: Components) -> Path:
    """The cache folder for these encoders and settings (see data.py for the layout)."""
    import hashlib

    h = hashlib.blake2b(digest_size=12)
    for module in (c.vae, c.text_encoder):
        for name, p in module.state_dict().items():
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(sorted(c.tokenizer.get_vocab().items())).encode())
    h.update(f"res={cfg.resolution} crop=centre maxlen={c.tokenizer.model_max_length}".encode())
    base = Path(cfg.cache_dir) if cfg.cache_dir else \
        Path(os.environ.get("LDM_CACHE_DIR") or Path.home() / ".cache" / "ldm") / "latents"
    return base / h.hexdigest()


def _interrupt_on_sigterm():
    """SIGTERM (a scheduler's stop, `kill`) behaves as Ctrl-C: checkpoint, then exit."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (a test calling train() from a worker): leave it alone
        pass


# ---- the run -----------------------------------------------------------------------------------------

def train(cfg: TrainConfig, resume: str | None = None, on_log=None, say=None) -> Path:
    """Train; returns the output (diffusers folder, or the LoRA file's folder).
    on_log(record, max_steps) for each logged step; say(text) for notes (default: stderr)."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    validate_config(cfg)
    say = say or (lambda text: print(f"ldm: {text}", file=sys.stderr))
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    examples, skipped = data.find_examples(cfg.data_dir, cfg.strict)  # bad data fails before anything is written
    resume_from = None
    if resume == "latest":
        resume_from = checkpoints.latest_checkpoint(ckpt_root)
        check(resume_from is not None, f"--resume latest: no complete checkpoint in {ckpt_root}")
    elif resume:
        resume_from = Path(resume)
        check(resume_from.is_dir(), f"--resume {resume}: no such checkpoint folder")

    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.device == "cpu",
                              dynamo_backend="inductor" if cfg.compile else "no")
    world, rank = accelerator.num_processes, accelerator.process_index
    steps_per_epoch = math.ceil(len(examples) / (cfg.batch_size * world * cfg.gradient_accumulation))
    max_steps = math.ceil(cfg.epochs * steps_per_epoch) if cfg.epochs else cfg.max_steps
    c = load_components(cfg.model, device=str(accelerator.device), dtype="fp32")
    c.vae.requires_grad_(False)
    c.text_encoder.requires_grad_(False)
    if accelerator.is_main_process:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_root.glob(".tmp-*"):  # left by a run killed while saving: never a checkpoint
            shutil.rmtree(stale, ignore_errors=True)

    # The network to train, and what of it is trained.
    torch.manual_seed(cfg.seed)  # from-scratch weights and LoRA's initial A depend on the seed only
    unet = build_unet(c, cfg.unet_config, cfg.resolution) if cfg.from_scratch else c.unet
    if cfg.lora_rank:
        from ldm_cli.lora import add_lora

        add_lora(unet, cfg.lora_rank, cfg.lora_alpha or None)
    else:
        unet.requires_grad_(True)
    unet.to(accelerator.device).train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    named = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    params = list(named.values())
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise LdmError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
        optimizer = bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=1e-2)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    lr_sched = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                             num_training_steps=max_steps)
    ema = [p.detach().float().clone() for p in params] if cfg.ema else None
    start = 0
    if resume_from is not None:
        trainable, ema_saved, state = checkpoints.load_checkpoint(resume_from)
        check(set(trainable) == set(named), f"{resume_from}: checkpoint of a different model or --lora-rank")
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(trainable[n])
        if ema is not None and ema_saved is not None:
            ema = [ema_saved[n].to(accelerator.device) for n in named]
        optimizer.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_scheduler"])
        start = state["step"]
    unet, optimizer = accelerator.prepare(unet, optimizer)  # the lr scheduler steps once per step, by us
    if resume_from is not None and accelerator.scaler is not None and "scaler" in state:
        accelerator.scaler.load_state_dict(state["scaler"])

    # Encoders are frozen: cache their outputs unless every epoch sees new crops or flips.
    vae_dtype = next(c.vae.parameters()).dtype

    def encode_pixels(pixels):  # -> posterior parameters [B, 2C, h, w]
        with torch.no_grad(), accelerator.autocast():
            if c.batch_invariant:  # one image at a time on CPU: the same bits as the cache (see models.py)
                return torch.cat([c.vae.encode(p[None].to(c.device, vae_dtype)).latent_dist.parameters.float()
                                  for p in pixels])
            return c.vae.encode(pixels.to(c.device, vae_dtype)).latent_dist.parameters.float()

    def encode_captions(captions):
        with accelerator.autocast():
            return encode_text(replace(c, device=accelerator.device), captions).float()

    cached = None
    if cfg.cache and not (cfg.random_crop or cfg.random_flip):
        folder = cache_folder(cfg, c)
        with accelerator.main_process_first():  # the first process encodes, the others then find it all
            cached = data.encode_dataset(examples, folder, cfg.resolution, encode_pixels, encode_captions,
                                         batch_size=max(cfg.batch_size, 8))
        if accelerator.is_main_process:
            say(f"latent cache {folder}: {cached.encoded} entries encoded, "
                f"{len(cached.moments) + len(cached.context) - cached.encoded} reused, {cached.seconds:.2f} s")

    def batch_inputs(step: int, micro: int, gen: torch.Generator):
        """This process's share of micro-batch `micro` of step `step`: (latents, text context)."""
        index = step * cfg.gradient_accumulation + micro
        rng = random.Random((cfg.seed * 7919 + index) * 131 + micro)
        batch = step_examples(examples, index, cfg.batch_size * world, cfg.seed)
        drop = [rng.random() < cfg.caption_dropout for _ in batch]  # decided for the global batch
        mine = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
        batch, drop = batch[mine], drop[mine]
        captions = ["" if d else e.caption for e, d in zip(batch, drop)]
        if cached is not None:
            moments = torch.stack([cached.moments[e.path] for e in batch]).to(accelerator.device)
            context = torch.stack([cached.context[cap] for cap in captions]).to(accelerator.device)
        else:
            pixels = torch.stack([data.load_pixels(e, cfg.resolution, rng, cfg.random_crop, cfg.random_flip)
                                  for e in batch])
            moments, context = encode_pixels(pixels), encode_captions(captions)
        latents = sample_posterior(moments, gen) * c.vae.config.scaling_factor
        return latents, context

    def save(step: int) -> Path:
        model = accelerator.unwrap_model(unet)
        trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        state = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_sched.state_dict(), "step": step}
        if accelerator.scaler is not None:
            state["scaler"] = accelerator.scaler.state_dict()
        ema_dict = dict(zip(trained, ema)) if ema is not None else None
        return checkpoints.save_checkpoint(ckpt_root, step, trained, ema_dict, state,
                                           {"train": asdict(cfg), "unet": dict(model.config)}, cfg.keep_checkpoints)

    log = open(out / "log.jsonl", "a") if accelerator.is_main_process else None
    pending: list[tuple[int, torch.Tensor, float]] = []  # (step, loss on the device, lr)
    t_start, images_done = time.perf_counter(), 0

    def flush_log():
        if not pending:
            return
        values = torch.stack([loss for _, loss, _ in pending]).float().cpu().tolist()  # one sync per flush
        elapsed = time.perf_counter() - t_start
        records = [{"step": step, "loss": value, "lr": lr, "elapsed_s": round(elapsed, 3),
                    "images_per_s": round(images_done / elapsed, 3) if elapsed > 0 else None}
                   for (step, _, lr), value in zip(pending, values)]
        pending.clear()
        if log is None:
            return
        try:
            log.write("".join(json.dumps(r) + "\n" for r in records))
            log.flush()
        except checkpoints.WRITE_ERRORS as e:
            raise checkpoints.write_failed(out / "log.jsonl", e) from None
        if on_log is not None:
            for r in records:
                on_log(r, max_steps)

    _interrupt_on_sigterm()
    step = start
    try:
        for step in range(start, max_steps):
            gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 64 + rank)
            total = torch.zeros((), device=accelerator.device)
            for micro in range(cfg.gradient_accumulation):
                latents, context = batch_inputs(step, micro, gen)
                last = micro == cfg.gradient_accumulation - 1
                with nullcontext() if last else accelerator.no_sync(unet):  # all-reduce once per step
                    with accelerator.autocast():
                        loss = diffusion_loss(unet, c, latents, context, gen, cfg.noise_offset, cfg.min_snr_gamma)
                    accelerator.backward(loss / cfg.gradient_accumulation)
                total += loss.detach() / cfg.gradient_accumulation
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
            optimizer.step()
            lr_sched.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema_update(ema, params, ema_decay_at(step, cfg.ema_decay))
            images_done += cfg.batch_size * world * cfg.gradient_accumulation
            pending.append((step + 1, accelerator.reduce(total, reduction="mean"), lr_sched.get_last_lr()[0]))
            if (step + 1) % cfg.log_every == 0:
                flush_log()
            if cfg.validate_every and (step + 1) % cfg.validate_every == 0 and cfg.validation_prompts:
                flush_log()
                validate(accelerator, unet, ema, params, c, cfg, step + 1)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < max_steps:
                flush_log()
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    save(step + 1)
    except KeyboardInterrupt:
        flush_log()
        done = step  # the step in flight did not finish; everything before it did
        where = save(done) if accelerator.is_main_process and done > start else None
        raise LdmError(f"interrupted at step {done}" + (f"; checkpoint {where}; continue with --resume latest"
                                                         if where else "; nothing new to save"), 130) from None
    flush_log()
    if log is not None:
        log.close()
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return out
    save(max_steps)
    if skipped:
        (out / "skipped.txt").write_text("\n".join(skipped) + "\n")
    model = accelerator.unwrap_model(unet).eval()
    result = _write_outputs(model, c, cfg, out, "lora" if cfg.lora_rank else "model")
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
        _write_outputs(model, c, cfg, out, "lora-ema" if cfg.lora_rank else "model-ema")
    return result


def _write_outputs(unet, c: Components, cfg: TrainConfig, out: Path, name: str) -> Path:
    """OUT/model (a diffusers folder) or OUT/lora (diffusers' LoRA file), written atomically."""
    final, tmp = out / name, out / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if cfg.lora_rank:
            from ldm_cli.lora import save_lora

            save_lora(unet, tmp)
        else:
            save_components(replace(c, unet=unet), tmp)
    except checkpoints.WRITE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise checkpoints.write_failed(final, e) from None
    if final.exists():  # renamed away before deletion: a kill in between leaves the new one in place
        old = out / f".tmp-old-{name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def validate(accelerator, unet, ema, params, c: Components, cfg: TrainConfig, step: int) -> None:
    """Sample the validation prompts (with the EMA weights when kept) into OUT/validation/step-N.png."""
    from ldm_cli import images, pipeline
    from ldm_cli.config import Settings

    if accelerator.is_main_process:
        model = accelerator.unwrap_model(unet)
        saved = [p.detach().clone() for p in params] if ema is not None else None
        with torch.no_grad():
            if ema is not None:
                for p, e in zip(params, ema):
                    p.copy_(e)
            model.eval()
            vc = replace(c, unet=model)
            n = len(cfg.validation_prompts)
            with accelerator.autocast():
                pics = pipeline.txt2img(vc, list(cfg.validation_prompts), [""] * n, list(range(n)),
                                        Settings(steps=cfg.validation_steps, width=cfg.resolution,
                                                 height=cfg.resolution))
            model.train()
            if saved is not None:
                for p, s in zip(params, saved):
                    p.copy_(s)
        folder = images.ensure_dir(Path(cfg.out_dir) / "validation")
        images.save_png(images.grid(images.to_pil(pics)), folder / f"step-{step:07d}.png", None, True)
    accelerator.wait_for_everyone()
