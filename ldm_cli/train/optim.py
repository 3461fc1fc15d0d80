"""The trained network, its optimizer and learning-rate schedule, and restoring them from a checkpoint."""

import json
from pathlib import Path

import torch

from ldm_cli.errors import LdmError, check
from ldm_cli.models.components import Components
from ldm_cli.train import checkpoints
from ldm_cli.train.config import UNET_PRESETS, TrainConfig, resume_changes


def build_unet(c: Components, preset: str, resolution: int):
    """A new UNet2DConditionModel from a preset or a config.json, shaped for c's VAE and text encoder."""
    from diffusers import UNet2DConditionModel

    if preset in UNET_PRESETS:
        kw = dict(UNET_PRESETS[preset])
    else:
        path = Path(preset)
        check(path.is_file(), f"--unet-config {preset!r}: not a preset ({', '.join(UNET_PRESETS)}) or a file")
        try:
            kw = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
            check(sum(int(w) for w in kw.get("block_out_channels", ())) <= 20_000
                  and int(kw.get("layers_per_block", 1) if not isinstance(kw.get("layers_per_block"), list)
                          else max(kw["layers_per_block"])) <= 64,
                  f"--unet-config {preset}: block_out_channels / layers_per_block far beyond any U-Net")
        except (ValueError, UnicodeDecodeError, TypeError, AttributeError, RecursionError) as e:
            raise LdmError(f"--unet-config {preset}: not a JSON config ({e})") from None
    channels = c.vae.config.latent_channels
    kw.update(sample_size=resolution // c.vae_scale, in_channels=channels, out_channels=channels,
              cross_attention_dim=c.text_encoder.config.hidden_size)
    try:
        unet = UNet2DConditionModel(**kw)
    except (TypeError, ValueError, AttributeError, RuntimeError, MemoryError) as e:
        raise LdmError(f"--unet-config {preset}: not a valid UNet2DConditionModel config "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
    return unet


def trainable_unet(c: Components, cfg: TrainConfig, seed: int):
    """The network to train (the model's U-Net, or a new one) with only what is trained requiring grad;
    returns (unet, {name: trained parameter})."""
    torch.manual_seed(seed)  # from-scratch weights and LoRA's initial A depend on the seed only
    unet = build_unet(c, cfg.unet_config, cfg.resolution) if cfg.from_scratch else c.unet
    if cfg.lora_rank:
        from ldm_cli.models.lora import add_lora

        add_lora(unet, cfg.lora_rank, cfg.lora_alpha or None)
    else:
        unet.requires_grad_(True)
    return unet, {n: p for n, p in unet.named_parameters() if p.requires_grad}


def trainable(c: Components, cfg: TrainConfig):
    """(the module whose parameters train, the U-Net the loss runs, {name: trained parameter}): the
    U-Net (or its LoRA adapters) itself, or with --textual-inversion the text encoder, of which only the
    new token's vectors train (train/inversion.py), beside a frozen U-Net."""
    if not cfg.textual_inversion:
        unet, named = trainable_unet(c, cfg, cfg.seed)
        return unet, unet, named
    from ldm_cli.train.inversion import PairEncoder, add_token

    vectors = add_token(c, cfg.textual_inversion, cfg.init_word, cfg.vectors)
    c.unet.requires_grad_(False)
    encoder = c.text_encoder if len(vectors) == 1 else PairEncoder(c.text_encoder, c.text_encoder_2)
    return encoder, c.unet, dict(zip(("vectors", "vectors_2"), vectors))


def build_optimizer(cfg: TrainConfig, params: list):
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise LdmError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=1e-2)
    # fused on CUDA: one kernel for all parameters (train/fast.py); the CPU keeps its bitwise-tested path
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2, fused=True if params[0].is_cuda else None)


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b (one shape) hold their elements in the same order in memory: the same strides, bar those of
    size-1 dimensions (which order nothing: a 1x1 convolution's weight is the same array in either layout)."""
    return [s for s, n in zip(a.stride(), a.shape) if n != 1] == [s for s, n in zip(b.stride(), b.shape) if n != 1]


def laid_out_as(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t (p's shape) on p's device, in p's memory layout, keeping t's dtype."""
    t = t.to(p.device)
    return t if same_layout(t, p) else torch.empty_like(p, dtype=t.dtype).copy_(t)


def moments_laid_out_as_params(optimizer) -> None:
    """Each parameter's optimizer state in the parameter's own memory layout, in place. Why: fused AdamW walks a
    parameter, its gradient and its moments as flat arrays, so moments saved by a run in another layout (NCHW
    against channels_last: train/fast.py's choice differs by --compile, and `auto`'s by --max-steps) would be
    read permuted, and the update silently wrong. load_state_dict keeps the saved tensors' strides. 8-bit AdamW's
    moments are quantized in blocks of the flat array, so theirs cannot move: that resume is refused."""
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == p.shape and not same_layout(v, p):
                check(v.is_floating_point(), "this checkpoint's 8-bit optimizer state was written with the U-Net in "
                      "another memory layout (channels_last under --compile full on CUDA, NCHW otherwise); resume "
                      "with the --compile it was written with")
                state[k] = laid_out_as(p, v)


def build_schedule(cfg: TrainConfig, optimizer, max_steps: int):
    """diffusers' schedule of that name. Its `constant` and `piecewise_constant` ignore num_warmup_steps
    silently, so `--warmup-steps N` turns `constant` into `constant_with_warmup` and is refused with
    `piecewise_constant`."""
    from diffusers.optimization import get_scheduler

    name = cfg.lr_scheduler
    if cfg.warmup_steps and name == "constant":
        name = "constant_with_warmup"
    if cfg.warmup_steps and name == "piecewise_constant":
        raise LdmError("--warmup-steps does not apply to --lr-scheduler piecewise_constant: drop one of them")
    try:
        return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=max_steps)
    except ValueError as e:
        raise LdmError(f"--lr-scheduler {cfg.lr_scheduler!r}: {str(e).splitlines()[0][:200]}") from None


def check_resume(ckpt: Path, cfg: TrainConfig, say) -> bool:
    """Compare the checkpoint's saved config with this run's: a changed model, rank or resolution is
    refused; a changed learning-rate schedule is applied from the checkpoint's step and said; any other
    change is said (the run will then differ from an unbroken one). Returns whether the schedule changed."""
    refused, schedule, other = resume_changes(checkpoints.saved_config(ckpt), cfg)
    check(not refused, f"--resume {ckpt}: changed since that checkpoint: {'; '.join(refused)}; a checkpoint "
          "continues the same model: put them back, or start a new run in another --out")
    if schedule:
        say(f"resume: learning-rate schedule changed ({'; '.join(schedule)}): applied from the checkpoint's step")
    if other:
        say(f"resume: changed since the checkpoint ({'; '.join(other)}): applied; the run will differ from an "
            "unbroken one")
    return bool(schedule)


def restore(ckpt: Path, named: dict, optimizer, lr_sched, ema, cfg: TrainConfig, schedule_changed: bool):
    """Load a checkpoint's weights, EMA, optimizer and schedule state into the run; returns (step, ema,
    state). With a changed schedule, the new one continues from the saved step at the new values."""
    trainable, ema_saved, state = checkpoints.load_checkpoint(ckpt)
    check(set(trainable) == set(named), f"{ckpt}: checkpoint of a different model or --lora-rank")
    try:
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(trainable[n])
    except RuntimeError as e:
        raise LdmError(f"{ckpt}: checkpoint of a different model shape ({str(e).splitlines()[0][:160]})") from None
    if ema is not None and ema_saved is not None:
        ema = [laid_out_as(p, ema_saved[n]) for n, p in named.items()]
    optimizer.load_state_dict(state["optimizer"])
    moments_laid_out_as_params(optimizer)
    lr_sched.load_state_dict(state["lr_scheduler"])
    if schedule_changed and hasattr(lr_sched, "lr_lambdas"):  # all of diffusers' schedules are LambdaLR
        lr_sched.base_lrs = [cfg.lr for _ in optimizer.param_groups]
        for group, base, fn in zip(optimizer.param_groups, lr_sched.base_lrs, lr_sched.lr_lambdas):
            group["initial_lr"], group["lr"] = base, base * fn(lr_sched.last_epoch)
        lr_sched._last_lr = [g["lr"] for g in optimizer.param_groups]
    return state["step"], ema, state
