"""`ldm train`: fine-tune a U-Net (full or LoRA) or train one from scratch, in a frozen VAE's latent
space, conditioned on a frozen text encoder. `train()` reads top to bottom: setup, restore, loop, save.

Determinism: optimizer step k's examples, caption dropout and noise come from generators seeded by
(seed, k), so a run resumed from the checkpoint of step k goes on exactly as
the unbroken run would have; no RNG state needs saving.
Processes: `accelerate launch -m ldm_cli train ...` (or `ldm train --gpus N`) runs one copy per GPU;
each step's global batch of batch_size x processes examples is split between them, its noise drawn for the
whole global batch (loss.Share), and DDP averages the gradients: N processes of batch B train as one process
of batch N x B (to float rounding). One process gives the same numbers as a run without accelerate's launcher.
"""

import logging
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ldm_cli.errors import RUNTIME, LdmError, check
from ldm_cli.models.defaults import FILE, default_model, train_lr
from ldm_cli.models.load import load_components
from ldm_cli.train import cache, checkpoints, data, fast, folders, recompute
from ldm_cli.train.batches import Batches, Encoders
from ldm_cli.train.config import TrainConfig, steps_for, validate_config, validate_for_model
from ldm_cli.train.log import LossLog, first_step_note
from ldm_cli.train.loss import diffusion_loss, ema_decay_at, ema_update
from ldm_cli.train.optim import build_optimizer, build_schedule, check_resume, restore, trainable
from ldm_cli.train.outputs import make_out_folder, output_kind, prepare_out_folder, validation_grid, write_models
from ldm_cli.train.validation import ValidationLoss

log = logging.getLogger("ldm")


def stale(folder: Path, checkpoint: Path) -> bool:
    """No model folder, or one written before the checkpoint (an earlier stop's, when a run trained on over
    several sittings): the checkpoint's step has no model folder yet."""
    return not folder.exists() or folder.stat().st_mtime < Path(checkpoint).stat().st_mtime


def train(cfg: TrainConfig, resume: str | None = None, on_log=None, say=None) -> Path:
    """Train; returns the output (diffusers folder, or the LoRA file's folder).
    on_log(record, max_steps) for each logged step; say(text) for notes (default: the `ldm` logger)."""
    from accelerate import Accelerator

    validate_config(cfg)
    say = say or log.info
    out = Path(cfg.out_dir)
    examples, skipped = data.find_examples(cfg.data_dir, cfg.strict,  # bad data fails before anything is written
                                           cfg.instance_prompt or cfg.textual_inversion)
    folders.check_folders(cfg)
    resume_from = checkpoints.find_resume(out / "checkpoints", resume)
    marks = {"start": time.perf_counter()}  # where the time to the first step goes (first_step_note)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.device == "cpu")
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    prepare_out_folder(cfg, resuming=resume_from is not None, clear=main)
    device = "cpu" if accelerator.device.type == "cpu" else str(accelerator.device)  # gloo processes say cpu:0
    c = load_components(cfg.model or default_model(), device=device, dtype="fp32")
    marks["models"] = time.perf_counter()
    if cfg.zero_terminal_snr:
        c = zero_terminal_snr(c, say)
    cfg = resolved_for(cfg, c)
    with accelerator.main_process_first():  # class images are drawn once, by the first process
        sets = folders.arrange(cfg, c, examples, skipped, say if main else lambda _: None)
    max_steps = steps_for(cfg, len(sets.train), world)
    cfg = replace(cfg, max_steps=max_steps)
    schedule_changed = check_resume(resume_from, cfg, say) if resume_from else False
    if main:
        make_out_folder(cfg)

    encoders = Encoders(c, accelerator)  # encoded before a new token changes the text encoder
    finished = resume_from is not None and (checkpoints.named_step(resume_from) or 0) >= max_steps
    # a finished run only writes its folders: no image is read (a run that does train goes on uncached)
    cached, readable = (None, sets.train) if finished else cached_encodings(
        cfg, sets.train + sets.held_out + sets.classes, skipped, c, encoders, accelerator, say)
    marks["data"] = time.perf_counter()
    readable = {e.path for e in readable}
    examples = [e for e in sets.train if e.path in readable]
    check(examples != [], f"{cfg.data_dir}: no readable images")
    if cfg.textual_inversion:
        check_token_used(cfg, examples, say)
    model, unet, named, compiled, compile_key = unet_for_training(
        c, cfg, accelerator, world, say if main else lambda _: None,
        None if resume_from else {e.bucket for e in sets.train + sets.classes})
    params = list(named.values())
    optimizer = build_optimizer(cfg, params)
    lr_sched = build_schedule(cfg, optimizer, max_steps)
    ema = [p.detach().float().clone() for p in params] if cfg.ema else None
    start, state = 0, {}
    if resume_from is not None:
        start, ema, state = restore(resume_from, named, optimizer, lr_sched, ema, cfg, schedule_changed)
    model, optimizer = accelerator.prepare(model, optimizer)  # the lr scheduler steps once per step, by us
    unet = unet if cfg.textual_inversion else model
    encoders.trained_text = model if cfg.textual_inversion else None
    if accelerator.scaler is not None and "scaler" in state:
        accelerator.scaler.load_state_dict(state["scaler"])
    if start >= max_steps:  # a finished run: nothing to train, nothing rewritten that holds this step
        say(f"{resume_from} is at step {start} of {max_steps}: nothing to train (raise --max-steps to go on)")
        if main and stale(out / output_kind(cfg), resume_from):  # stopped by a signal: no model of this step
            with checkpoints.uninterrupted():
                return write_models(trained_components(accelerator, c, unet, cfg), params, ema, cfg, out)
        return out / output_kind(cfg)

    batches, classes, validation = feeds(cfg, sets, readable, encoders, cached, world, rank)
    run = Run(cfg, accelerator, c, model, unet, params, optimizer, lr_sched, ema, (batches, classes), validation,
              LossLog(out / "log.jsonl", main, max_steps, on_log),
              saver(accelerator, optimizer, lr_sched, named, ema, cfg, dict(accelerator.unwrap_model(unet).config)),
              compiled, compile_key, say)
    marks["set-up"] = time.perf_counter()
    run_steps(run, start, marks)
    if validation is not None and not (cfg.validate_every and max_steps % cfg.validate_every == 0):
        validate(accelerator, c, unet, replace(cfg, validation_prompts=()), ema, params, validation, run.losses,
                 max_steps, say)  # the last step's, always
    run.losses.close()
    accelerator.wait_for_everyone()
    if not main:
        return out
    run.save(max_steps)
    if skipped or batches.skipped:
        (out / "skipped.txt").write_text("\n".join(skipped + batches.skipped) + "\n")
    with checkpoints.uninterrupted():
        return write_models(trained_components(accelerator, c, unet, cfg), params, ema, cfg, out)


@dataclass
class Run:
    """What the loop steps with, as train() set it up."""
    cfg: TrainConfig
    accelerator: object
    c: object  # the model's components; the trained U-Net (or text encoder) in place
    model: torch.nn.Module  # holds the trained parameters: the U-Net, or the text encoder of a new token
    unet: torch.nn.Module
    params: list  # the trained parameters, in the order of ema's copies and the checkpoints
    optimizer: object
    lr_sched: object
    ema: list | None
    feeds: tuple  # (the Batches of the data, those of DreamBooth's class images or None)
    validation: ValidationLoss | None
    losses: LossLog
    save: object  # saver()'s
    compiled: str  # the --compile mode this run got
    compile_key: str | None  # its name once compiled (fast.remember_compiled), None where nothing compiles
    say: object


def run_steps(run: Run, start: int, marks: dict) -> None:
    """Steps start+1..max_steps, each followed by the EMA, the loss log, validation and mid-run checkpoints as the
    config asks. Whatever stops the loop, what was done is saved first (rescue) and the error says where."""
    cfg, accelerator = run.cfg, run.accelerator
    main, images = accelerator.is_main_process, cfg.batch_size * accelerator.num_processes * cfg.gradient_accumulation
    budget = recompute.compiled_budget(cfg.selective_checkpointing)
    done = start  # steps finished: what a checkpoint written now holds
    try:
        for step in range(start, cfg.max_steps):
            with fast.compile_limits(budget) if run.compiled != "none" else nullcontext():  # importing dynamo: ~2 s
                fast.step_begins(run.compiled)
                loss = train_step(cfg, run.model, run.unet, run.c.schedule, run.feeds, run.optimizer, run.lr_sched,
                                  accelerator, step)
            if step == start and main:
                run.say(first_step_note(marks, run.compiled, accelerator.device))
                if run.compile_key:  # a later run of this step may compile sooner (fast.chosen_compile)
                    fast.remember_compiled(run.compile_key)
            if run.ema is not None:
                ema_update(run.ema, run.params, ema_decay_at(step, cfg.ema_decay))
            done = step + 1
            run.losses.add(done, loss, run.lr_sched.get_last_lr()[0], images)
            if done % cfg.log_every == 0:
                run.losses.flush()
            if cfg.validate_every and done % cfg.validate_every == 0 and (cfg.validation_prompts or run.validation):
                run.losses.flush()
                validate(accelerator, run.c, run.unet, cfg, run.ema, run.params, run.validation, run.losses, done,
                         run.say)
            run.save.writer.poll()  # a background checkpoint's full disk stops the run now
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
                run.losses.flush()
                accelerator.wait_for_everyone()
                if main:
                    run.save(done, background=True)
    except checkpoints.WriteFailed:  # the disk that refused the save would refuse a rescue too
        raise
    except BaseException as e:  # save what was done first, whatever stopped the loop
        raise stopped(e, done, rescue(run.save, run.losses, main and done > start, done)) from None


def unet_for_training(c, cfg: TrainConfig, accelerator, world: int, say, shapes: set | None):
    """(model, unet, named parameters, compile mode, its fast.compile_key or None): trainable()'s, the U-Net on the
    device in training mode, with the --compile mode this run gets (for the data's image `shapes`; None: a resumed
    run, which keeps the cold rule, as a layout chosen anew could refuse its 8-bit optimizer state), its gradient
    checkpointing and train/fast.py's speed levers."""
    model, unet, named = trainable(c, cfg)
    device = accelerator.device
    unet.to(device).train()
    settings = fast.step_settings(cfg, world, shapes or set())
    named_here = device.type == "cuda" and shapes is not None
    key_of = (lambda mode: fast.compile_key(mode, dict(unet.config), settings, device)) if named_here else None
    compiled = fast.chosen_compile(cfg, device, cfg.max_steps, world, say, sum(p.numel() for p in unet.parameters()),
                                   key_of)
    recompute.enable(unet, cfg.gradient_checkpointing, cfg.selective_checkpointing, compiled != "none")
    note = recompute.eager_note(cfg.selective_checkpointing, compiled != "none", accelerator.device)
    if note:
        say(note)
    fast.speed_up(unet, compiled, accelerator.device)
    return model, unet, named, compiled, key_of(compiled) if key_of and compiled != "none" else None


def resolved_for(cfg: TrainConfig, c) -> TrainConfig:
    """The config with what the model decides filled in (as saved in checkpoints: nothing left implicit),
    checked against the model."""
    native = c.unet.config.sample_size * c.vae_scale
    cfg = replace(cfg, model=cfg.model or default_model(), resolution=cfg.resolution or native)
    if cfg.lr is None:  # the model's own (ldm_defaults.json), else 1e-4, or 5e-3 for an embedding (A1111's)
        kind = "textual_inversion" if cfg.textual_inversion else "lora" if cfg.lora_rank else "full"
        own = None if cfg.from_scratch else train_lr(cfg.model, kind)
        if own is not None:
            named = {"full": "a full fine-tune", "lora": "a LoRA", "textual_inversion": "an embedding"}[kind]
            log.info(f"lr {own:g}: this model's own for {named} ({cfg.model}/{FILE}); "
                     "--lr sets another")
        cfg = replace(cfg, lr=own or (5e-3 if cfg.textual_inversion else 1e-4))
    validate_for_model(cfg, c.schedule.num_train_timesteps)
    check(c.family != "sdxl-refiner", f"{cfg.model}: an SDXL refiner; ldm trains SD 1.x/2.x and SDXL base models")
    check(c.family == "sd" or not cfg.from_scratch, "--from-scratch builds an SD-1.x-shaped U-Net; with an SDXL "
          "model, fine-tune it (drop --from-scratch) or train a LoRA")
    if not native // 2 <= cfg.resolution <= 2 * native:
        log.warning(f"warning: --resolution {cfg.resolution} is far from this model's native {native}; expect slow "
                    "steps and poor images")
    return cfg


def feeds(cfg: TrainConfig, sets, readable: set, encoders: Encoders, cached, world: int, rank: int):
    """(the data's Batches, the class images' Batches or None, the ValidationLoss or None), over the readable
    examples of each set."""
    batches = Batches(cfg, [e for e in sets.train if e.path in readable], encoders, cached, world, rank)
    classes = [e for e in sets.classes if e.path in readable]
    held_out = [e for e in sets.held_out if e.path in readable]
    return (batches, Batches(cfg, classes, encoders, cached, world, rank) if classes else None,
            ValidationLoss(cfg, held_out, encoders, cached) if held_out else None)


def validate(accelerator, c, unet, cfg: TrainConfig, ema, params, validation, losses: LossLog, step: int, say):
    """The validation grid (with --validation-prompt) and the validation loss (with held-out images), run eager:
    a compiled training U-Net would compile again for the no-grad calls of another batch, and the training graph
    after them (the batch then dynamic): on an H200 the embedded model's run made no step in the 200 s after its
    first validation, having made its steps 100-1,000 in the 70 s before it."""
    with torch.compiler.set_stance("force_eager"):
        if cfg.validation_prompts:
            validation_grid(accelerator, trained_components(accelerator, c, unet, cfg), ema, params, cfg, step)
        if validation is not None and accelerator.is_main_process:
            value = validation(accelerator.unwrap_model(unet), c.schedule, accelerator)
            losses.record({"step": step, "validation_loss": value})
            say(f"step {step}: validation loss {value:.6f} ({len(validation.examples)} images)")


def zero_terminal_snr(c, say):
    """The model's schedule with zero terminal SNR (Lin et al. 2024, sec. 3): rescaled betas, v-prediction (an
    epsilon model cannot predict noise from pure noise) and trailing timesteps; written into the trained model's
    scheduler config, so sampling it uses the same."""
    from ldm_cli.diffusion.schedule import schedule_from_config

    config = {**c.scheduler_config, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
              "timestep_spacing": "trailing"}
    if c.schedule.prediction_type != "v_prediction":
        say(f"note: --zero-terminal-snr: the model predicts {c.schedule.prediction_type}; it is fine-tuned to "
            "predict v")
    return replace(c, scheduler_config=config, schedule=schedule_from_config(config))


def trained_components(accelerator, c, unet, cfg: TrainConfig):
    """The model as trained so far (the trained U-Net in place, or c itself: a new token lives in its
    text encoder)."""
    return c if cfg.textual_inversion else replace(c, unet=accelerator.unwrap_model(unet))


def check_token_used(cfg: TrainConfig, examples, say) -> None:
    """An embedding learns only from captions naming its token: none is an error, some a note."""
    from ldm_cli.train.inversion import tokens_in

    token = cfg.textual_inversion
    missing = sum(not tokens_in(e.caption, token) for e in examples)
    check(missing < len(examples), f"--textual-inversion {token}: no caption names {token}, so nothing would "
          f"train; put {token} in the captions, or train on images without captions (they read "
          f"--instance-prompt, by default {token!r})")
    if missing:
        say(f"note: {missing} of {len(examples)} captions do not name {token}; they train nothing")


def saver(accelerator, optimizer, lr_sched, named: dict, ema, cfg: TrainConfig, unet_config: dict):
    """save(step, background=False): write checkpoint `step` of this run (weights, EMA, optimizer, schedule,
    config); `background`: copied to the host and written while training goes on, where the host has the
    memory (checkpoints.Writer, one write at a time: each save waits for the one before). save.writer.poll()
    raises a background write's failure."""
    writer = checkpoints.Writer()

    def save(step: int, background: bool = False) -> Path:
        state = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_sched.state_dict(), "step": step}
        if accelerator.scaler is not None:
            state["scaler"] = accelerator.scaler.state_dict()
        ema_named = dict(zip(named, ema)) if ema is not None else None
        return writer.save(Path(cfg.out_dir) / "checkpoints", step, named, ema_named, state,
                           {"train": asdict(cfg), "unet": unet_config}, cfg.keep_checkpoints, background)

    save.writer = writer
    return save


def rescue(save, losses, worth_it: bool, done: int) -> Path | None:
    """Write a checkpoint of the `done` steps after a failure, if there is new work and it can be written;
    SIGINT/SIGTERM are held off meanwhile, so a second Ctrl-C cannot cut the save short."""
    with checkpoints.uninterrupted(deliver=False):
        try:
            losses.flush()
        except Exception:  # noqa: BLE001 (the log is secondary: the checkpoint is what counts)
            pass
        if not worth_it:
            return None
        try:
            return save(done)
        except Exception as e:  # noqa: BLE001 (e.g. the disk that failed the step is still full)
            log.warning(f"warning: could not save a checkpoint at step {done} ({e}); the previous one is intact")
            return None


def stopped(e: BaseException, done: int, where: Path | None) -> BaseException:
    """The error to show for a loop stopped by `e` after `done` steps, `where` the checkpoint saved."""
    tail = f"checkpoint {where}; continue with --resume latest" if where else "nothing new to save"
    if isinstance(e, KeyboardInterrupt):
        return LdmError(f"interrupted at step {done}; {tail}", 130)
    if isinstance(e, LdmError):
        return LdmError(f"{e} (stopped at step {done}; {tail})", e.exit_code)
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return LdmError(f"out of memory at step {done}: try a smaller --batch-size (with --gradient-accumulation) "
                        f"or --selective-checkpointing, or --gradient-checkpointing; {tail}", RUNTIME)
    if isinstance(e, OSError):
        return LdmError(f"stopped at step {done}: {e.strerror or e}; {tail}", RUNTIME)
    log.error(f"error: a bug stopped training at step {done}; {tail}")
    return e  # a bug: its traceback is shown


def cached_encodings(cfg: TrainConfig, examples, skipped: list, c, encoders: Encoders, accelerator, say):
    """(the latent cache's contents for these examples, encoding what it lacks, or None when every
    epoch sees new pixels (random crop/flip) or the cache is off; the examples it could read). The
    encoders are frozen: their outputs never change. Unreadable images are left out and added to
    `skipped` (--strict: the run stops)."""
    if not cfg.cache or cfg.random_crop or cfg.random_flip:
        return None, examples
    folder = cache.cache_folder(cfg.cache_dir, cfg.resolution, c)  # entries of a bucketed image name their bucket
    with accelerator.local_main_process_first():  # one process a machine encodes, the others then find it all
        cached = cache.encode_dataset(examples, folder, cfg.resolution, encoders.pixels, encoders.captions,
                                      batch_size=max(cfg.batch_size, 8), pooled=c.family != "sd",
                                      # a new token's states, shuffled tags: the text changes each step
                                      texts=not (cfg.textual_inversion or cfg.shuffle_tags))
    if accelerator.is_main_process:
        say(f"latent cache {folder}: {cached.encoded} entries encoded, "
            f"{len(cached.moments) + len(cached.context) - cached.encoded} reused, {cached.seconds:.2f} s")
    if cached.skipped:
        check(not cfg.strict, f"{cached.skipped[0]}; fix it or drop --strict")
        skipped += cached.skipped
        examples = [e for e in examples if e.path in cached.moments]
        check(examples != [], f"{cfg.data_dir}: no readable images")
    return cached, examples


def train_step(cfg: TrainConfig, model, unet, schedule, feeds: tuple, optimizer, lr_sched, accelerator,
               step: int) -> torch.Tensor:
    """One optimizer step over cfg.gradient_accumulation micro-batches; returns the mean loss, on the device.
    `model` holds the trained parameters (the U-Net itself, or the text encoder of a new token); `feeds` is
    (the Batches of the data, those of DreamBooth's class images or None): with class images the loss is
    the data's plus --prior-loss-weight times theirs (Ruiz et al. 2023, eq. 2)."""
    batches, classes = feeds
    gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 64)  # one stream for every process
    total = torch.zeros((), device=accelerator.device)
    for micro in range(cfg.gradient_accumulation):
        latents, context = batches.batch(step, micro, gen)
        last = micro == cfg.gradient_accumulation - 1
        with nullcontext() if last else accelerator.no_sync(model):  # all-reduce once per step
            with accelerator.autocast():
                loss = diffusion_loss(unet, schedule, latents, context, gen, cfg.noise_offset, cfg.min_snr_gamma,
                                      share=batches.share)
                if classes is not None:
                    prior = diffusion_loss(unet, schedule, *classes.batch(step, micro, gen), gen, cfg.noise_offset,
                                           cfg.min_snr_gamma, share=batches.share)
                    loss = loss + cfg.prior_loss_weight * prior
            accelerator.backward(loss / cfg.gradient_accumulation)
        total += loss.detach() / cfg.gradient_accumulation
    if cfg.max_grad_norm:  # what the optimizer steps is what trains: its lists, not a walk of the modules a step
        accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.max_grad_norm)
    optimizer.step()
    lr_sched.step()
    optimizer.zero_grad(set_to_none=True)
    return accelerator.reduce(total, reduction="mean")
