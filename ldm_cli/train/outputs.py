"""What a run leaves besides checkpoints: the trained model (a diffusers folder, or a LoRA file) and
validation grids sampled with our own pipeline."""

from pathlib import Path

import torch

from ldm_cli.errors import check
from ldm_cli.io import images
from ldm_cli.io.files import atomic_folder, ensure_dir, remove_folder
from ldm_cli.jobs import Settings
from ldm_cli.models.components import Components
from ldm_cli.models.load import save_components
from ldm_cli.train import checkpoints
from ldm_cli.train.checkpoints import WRITE_ERRORS, write_failed
from ldm_cli.train.config import TrainConfig
from ldm_cli.train.loss import swap_in

OUTPUTS = ("model", "model-ema", "lora", "lora-ema", "embedding", "embedding-ema", "checkpoints", "validation",
           "log.jsonl", "skipped.txt", "config.toml")
KINDS = 6  # OUTPUTS[:KINDS]: the trained results


def prepare_out_folder(cfg: TrainConfig, resuming: bool, clear: bool = True) -> None:
    """Training output never replaces or deletes what it did not create: --out may not be (or be inside)
    the data folder, nor hold the data; a fresh run into an --out holding a run is refused unless
    --resume or --overwrite (which removes that run's own outputs, nothing else)."""
    out, data = Path(cfg.out_dir).resolve(), Path(cfg.data_dir).resolve()
    check(out != data and data not in out.parents, f"--out {cfg.out_dir} is inside the data folder {cfg.data_dir}: "
          "the run would write among your images; choose an --out outside it")
    for name in OUTPUTS:
        check(data != out / name and out / name not in data.parents,
              f"the data folder {cfg.data_dir} is inside --out's {name}, which training writes; move it or "
              "choose another --out")
    check(not out.exists() or out.is_dir(), f"--out {cfg.out_dir}: exists and is not a folder; choose another --out")
    if cfg.cache_dir:
        check(not Path(cfg.cache_dir).exists() or Path(cfg.cache_dir).is_dir(),
              f"--cache-dir {cfg.cache_dir}: exists and is not a folder; choose another")
    held = [name for name in OUTPUTS[:KINDS] if (out / name).exists()]
    held += [f"checkpoints up to {c.name}" for c in checkpoints.checkpoints(out / "checkpoints")[-1:]]
    if resuming or not held or not clear:  # clear: the main process only (the others just check)
        check(resuming or not held or cfg.overwrite, f"--out {cfg.out_dir} already holds a run ({', '.join(held)})")
        return
    check(cfg.overwrite, f"--out {cfg.out_dir} already holds a run ({', '.join(held)}): continue it with "
          "--resume latest, start over with --overwrite, or choose another --out")
    for c in checkpoints.checkpoints(out / "checkpoints"):
        remove_folder(c)
    for name in OUTPUTS[:KINDS] + ("validation",):
        if (out / name).is_dir():
            remove_folder(out / name)
    for name in ("log.jsonl", "skipped.txt", "config.toml"):
        (out / name).unlink(missing_ok=True)


def make_out_folder(cfg: TrainConfig) -> None:
    """OUT/checkpoints, created and proven writable before any training, and OUT/config.toml, the resolved
    settings (the main process)."""
    from ldm_cli.train.config_file import write_config

    ensure_dir(Path(cfg.out_dir) / "checkpoints")
    checkpoints.clean_stale(Path(cfg.out_dir) / "checkpoints")
    try:
        write_config(cfg, Path(cfg.out_dir) / "config.toml")
    except WRITE_ERRORS as e:
        raise write_failed(Path(cfg.out_dir) / "config.toml", e) from None


def output_kind(cfg: TrainConfig) -> str:
    return "embedding" if cfg.textual_inversion else "lora" if cfg.lora_rank else "model"


def write_model(c: Components, params, cfg: TrainConfig, out: Path, name: str) -> Path:
    """OUT/model (a diffusers folder), OUT/lora (diffusers' LoRA file) or OUT/embedding/TOKEN.safetensors,
    written atomically."""
    final, unet = out / name, c.unet
    try:
        with atomic_folder(final, replace=True) as tmp:
            if cfg.textual_inversion:
                from ldm_cli.train.inversion import save_embedding

                save_embedding(params, cfg.textual_inversion, tmp / f"{cfg.textual_inversion}.safetensors")
            elif cfg.lora_rank:
                from ldm_cli.models.lora import save_lora

                save_lora(unet, tmp, sdxl=c.family != "sd")
            else:
                save_components(c, tmp)
                _keep_model_defaults(cfg, tmp)
    except WRITE_ERRORS as e:
        raise write_failed(final, e) from None
    return final


def _keep_model_defaults(cfg: TrainConfig, folder: Path) -> None:
    """A fine-tune keeps its model's ldm_defaults.json (sampling defaults, training lr: the embedded model's
    cfg 5), so `ldm sample --model OUT/model` starts where the model it came from did; a new U-Net does not."""
    import shutil

    from ldm_cli.models import runs
    from ldm_cli.models.defaults import FILE

    source = runs.product(Path(cfg.model), "model") / FILE if cfg.model and not cfg.from_scratch else None
    if source is not None and source.is_file():
        shutil.copyfile(source, folder / FILE)


def write_models(c: Components, params, ema, cfg: TrainConfig, out: Path) -> Path:
    """The trained weights, and with --ema their average (OUT/model-ema, OUT/lora-ema, OUT/embedding-ema)."""
    kind = output_kind(cfg)
    c.unet.eval()
    result = write_model(c, params, cfg, out, kind)
    if ema is not None:
        swap_in(params, ema)
        write_model(c, params, cfg, out, f"{kind}-ema")
    return result


def validation_grid(accelerator, c: Components, ema, params, cfg: TrainConfig, step: int) -> None:
    """Sample the validation prompts with the model as trained so far (with the EMA weights when kept)
    into OUT/validation/step-N.png."""
    from ldm_cli.sample import pipeline

    if accelerator.is_main_process:
        model = c.unet
        saved = swap_in(params, ema) if ema is not None else None
        with torch.no_grad():
            model.eval()
            n = len(cfg.validation_prompts)
            with accelerator.autocast():
                pics = pipeline.txt2img(c, list(cfg.validation_prompts), [""] * n,
                                        list(range(n)), Settings(steps=cfg.validation_steps, width=cfg.resolution,
                                                                 height=cfg.resolution, sampler=cfg.validation_sampler))
            model.train()
        if saved is not None:
            swap_in(params, saved)
        folder = ensure_dir(Path(cfg.out_dir) / "validation")
        images.save_png(images.grid(images.to_pil(pics)), folder / f"step-{step:07d}.png", None, True)
    accelerator.wait_for_everyone()
