"""`ldm train`: fine-tune a U-Net (full or LoRA) or train one from scratch, in a frozen VAE's latent
space, conditioned on a frozen text encoder. `train()` reads top to bottom: setup, restore, loop, save.

Determinism: optimizer step k's examples, caption dropout and noise come from generators seeded by
(seed, k) (and the process rank), so a run resumed from the checkpoint of step k goes on exactly as
the unbroken run would have; no RNG state needs saving.
Processes: `accelerate launch -m ldm_cli train ...` (or `ldm train --gpus N`) runs one copy per GPU;
each step's global batch of batch_size x processes examples is split between them, and DDP averages
the gradients. One process gives the same numbers as a run without accelerate's launcher.
"""

import logging
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ldm_cli.errors import LdmError
from ldm_cli.models.load import default_model, load_components
from ldm_cli.train import cache, checkpoints, data
from ldm_cli.train.batches import Batches, Encoders
from ldm_cli.train.config import TrainConfig, steps_for, validate_config
from ldm_cli.train.log import LossLog
from ldm_cli.train.loss import diffusion_loss, ema_decay_at, ema_update
from ldm_cli.train.optim import build_optimizer, build_schedule, check_resume, restore, trainable_unet
from ldm_cli.train.outputs import validation_grid, write_models

log = logging.getLogger("ldm")


def train(cfg: TrainConfig, resume: str | None = None, on_log=None, say=None) -> Path:
    """Train; returns the output (diffusers folder, or the LoRA file's folder).
    on_log(record, max_steps) for each logged step; say(text) for notes (default: the `ldm` logger)."""
    from accelerate import Accelerator

    validate_config(cfg)
    say = say or log.info
    out = Path(cfg.out_dir)
    examples, skipped = data.find_examples(cfg.data_dir, cfg.strict)  # bad data fails before anything is written
    resume_from = checkpoints.find_resume(out / "checkpoints", resume)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.device == "cpu",
                              dynamo_backend="inductor" if cfg.compile else "no")
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    c = load_components(cfg.model or default_model(), device=str(accelerator.device), dtype="fp32")
    cfg = replace(cfg, model=cfg.model or default_model(),  # as saved in checkpoints: nothing left implicit
                  resolution=cfg.resolution or c.unet.config.sample_size * c.vae_scale)
    max_steps = steps_for(cfg, len(examples), world)
    cfg = replace(cfg, max_steps=max_steps)
    schedule_changed = check_resume(resume_from, cfg, say) if resume_from else False
    if main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        checkpoints.clean_stale(out / "checkpoints")

    unet, named = trainable_unet(c, cfg, cfg.seed)
    unet.to(accelerator.device).train()
    params = list(named.values())
    optimizer = build_optimizer(cfg, params)
    lr_sched = build_schedule(cfg, optimizer, max_steps)
    ema = [p.detach().float().clone() for p in params] if cfg.ema else None
    start, state = 0, {}
    if resume_from is not None:
        start, ema, state = restore(resume_from, named, optimizer, lr_sched, ema, cfg, schedule_changed)
    unet, optimizer = accelerator.prepare(unet, optimizer)  # the lr scheduler steps once per step, by us
    if accelerator.scaler is not None and "scaler" in state:
        accelerator.scaler.load_state_dict(state["scaler"])

    encoders = Encoders(c, accelerator)
    batches = Batches(cfg, examples, encoders, cached_encodings(cfg, examples, c, encoders, accelerator, say),
                      world, rank)

    def save(step: int) -> Path:
        model = accelerator.unwrap_model(unet)
        state = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_sched.state_dict(), "step": step}
        if accelerator.scaler is not None:
            state["scaler"] = accelerator.scaler.state_dict()
        ema_named = dict(zip(named, ema)) if ema is not None else None
        return checkpoints.save_checkpoint(out / "checkpoints", step, named, ema_named, state,
                                           {"train": asdict(cfg), "unet": dict(model.config)}, cfg.keep_checkpoints)

    losses = LossLog(out / "log.jsonl", main, max_steps, on_log)
    step = start
    try:
        for step in range(start, max_steps):
            loss = train_step(cfg, unet, c.schedule, batches, optimizer, lr_sched, accelerator, step, rank)
            if ema is not None:
                ema_update(ema, params, ema_decay_at(step, cfg.ema_decay))
            losses.add(step + 1, loss, lr_sched.get_last_lr()[0], cfg.batch_size * world * cfg.gradient_accumulation)
            if (step + 1) % cfg.log_every == 0:
                losses.flush()
            if cfg.validate_every and (step + 1) % cfg.validate_every == 0 and cfg.validation_prompts:
                losses.flush()
                validation_grid(accelerator, unet, ema, params, c, cfg, step + 1)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < max_steps:
                losses.flush()
                accelerator.wait_for_everyone()
                if main:
                    save(step + 1)
    except KeyboardInterrupt:
        losses.flush()
        done = step  # the step in flight did not finish; everything before it did
        where = save(done) if main and done > start else None
        raise LdmError(f"interrupted at step {done}" + (f"; checkpoint {where}; continue with --resume latest"
                                                         if where else "; nothing new to save"), 130) from None
    losses.close()
    accelerator.wait_for_everyone()
    if not main:
        return out
    save(max_steps)
    if skipped:
        (out / "skipped.txt").write_text("\n".join(skipped) + "\n")
    return write_models(accelerator.unwrap_model(unet), params, ema, c, cfg, out)


def cached_encodings(cfg: TrainConfig, examples, c, encoders: Encoders, accelerator, say):
    """The latent cache's contents for these examples (encoding what it lacks), or None when every
    epoch sees new pixels (random crop/flip) or the cache is off. The encoders are frozen: their
    outputs never change."""
    if not cfg.cache or cfg.random_crop or cfg.random_flip:
        return None
    folder = cache.cache_folder(cfg.cache_dir, cfg.resolution, c)
    with accelerator.main_process_first():  # the first process encodes, the others then find it all
        cached = cache.encode_dataset(examples, folder, cfg.resolution, encoders.pixels, encoders.captions,
                                      batch_size=max(cfg.batch_size, 8))
    if accelerator.is_main_process:
        say(f"latent cache {folder}: {cached.encoded} entries encoded, "
            f"{len(cached.moments) + len(cached.context) - cached.encoded} reused, {cached.seconds:.2f} s")
    return cached


def train_step(cfg: TrainConfig, unet, schedule, batches: Batches, optimizer, lr_sched, accelerator, step: int,
               rank: int) -> torch.Tensor:
    """One optimizer step over cfg.gradient_accumulation micro-batches; returns the mean loss, on the device."""
    gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 64 + rank)
    total = torch.zeros((), device=accelerator.device)
    for micro in range(cfg.gradient_accumulation):
        latents, context = batches.batch(step, micro, gen)
        last = micro == cfg.gradient_accumulation - 1
        with nullcontext() if last else accelerator.no_sync(unet):  # all-reduce once per step
            with accelerator.autocast():
                loss = diffusion_loss(unet, schedule, latents, context, gen, cfg.noise_offset, cfg.min_snr_gamma)
            accelerator.backward(loss / cfg.gradient_accumulation)
        total += loss.detach() / cfg.gradient_accumulation
    if cfg.max_grad_norm:
        accelerator.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
    optimizer.step()
    lr_sched.step()
    optimizer.zero_grad(set_to_none=True)
    return accelerator.reduce(total, reduction="mean")
