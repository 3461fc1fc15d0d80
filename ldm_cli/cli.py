"""The command line: parse, call one library function, print. The only module importing typer/rich.

Errors: library code raises LdmError; `main` prints it once as one line on stderr and exits with its
code (2: bad input, 1: the work failed). `--debug` (or LDM_DEBUG=1) shows the traceback instead.
"""

import json
import os
import secrets
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer

from ldm_cli.errors import USAGE, LdmError

try:  # typer >= 0.26 carries its own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException

# diffusers/transformers print advice and progress bars at import and on every save; ldm has its own
# output. Set here, before the commands import them: what they print at import time comes too early
# for their set_verbosity functions.
for _name, _value in (("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"),
                      ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
    os.environ.setdefault(_name, _value)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Text-to-image latent diffusion: sample, img2img, train, info.")

# ---- options shared by the commands (same names, same meaning everywhere) ----
Model = Annotated[Optional[str], typer.Option("--model", "-m", help="Diffusers folder, .safetensors file or hub id.")]
Config = Annotated[Optional[str], typer.Option(help="Single-file checkpoint: folder or hub id with the configs.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
Dtype = Annotated[str, typer.Option(help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16.")]
Unsafe = Annotated[bool, typer.Option("--allow-unsafe-pickle", help="Allow .ckpt/.bin/.pt weights (pickle can run code).")]
Steps = Annotated[int, typer.Option(help="DDIM steps.")]
Cfg = Annotated[float, typer.Option(help="Classifier-free guidance scale (<= 1: off).")]
Negative = Annotated[str, typer.Option(help="Negative prompt.")]
Seed = Annotated[Optional[int], typer.Option(help="Seed of the first image; image k uses seed + k. Default: random.")]
NumImages = Annotated[int, typer.Option("--num-images", "-n", help="Images per prompt.")]
BatchSize = Annotated[int, typer.Option(help="Images per U-Net batch.")]
Width = Annotated[Optional[int], typer.Option(help="Width in pixels (multiple of 8).")]
Height = Annotated[Optional[int], typer.Option(help="Height in pixels (multiple of 8).")]
Eta = Annotated[float, typer.Option(help="DDIM eta: 0 deterministic, 1 DDPM-like.")]
PromptFile = Annotated[Optional[Path], typer.Option(help="Prompts, one per line ('prompt | seed=7 cfg=4'), or .jsonl.")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
Grid = Annotated[bool, typer.Option(help="Also write a grid of all images.")]
Overwrite = Annotated[bool, typer.Option(help="Number files from 0 and replace existing ones.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print written paths and parameters as JSON.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
Debug = Annotated[bool, typer.Option(help="Show tracebacks.")]
Accel = Annotated[str, typer.Option(help="auto (CUDA graphs on CUDA), none, graphs, compile.")]
Lora = Annotated[Optional[str], typer.Option(help="LoRA file (or folder) to apply, e.g. OUT/lora from ldm train.")]
LoraScale = Annotated[float, typer.Option(help="LoRA strength (1: as trained).")]
VaeTiling = Annotated[str, typer.Option(help="Tiled VAE decode/encode: auto (above 1024x1024 pixels), on, off.")]


def _jobs_and_model(prompt, prompt_file, from_png, settings_kw, seed, num_images, model, init_images=(None,)):
    from ldm_cli.config import Settings, build_jobs
    from ldm_cli.images import read_png_job
    from ldm_cli.prompts import read_prompt_file

    if from_png is not None:
        if prompt or prompt_file:
            raise LdmError("--from-png redoes one image: give no PROMPT or --prompt-file with it")
        job, png_model = read_png_job(from_png)
        return [job], model or png_model
    lines = [(p, {}, "") for p in prompt or []]
    if prompt_file is not None:
        lines += read_prompt_file(prompt_file)
    if not lines:
        raise LdmError("no prompt: give PROMPT arguments or --prompt-file FILE")
    seed = secrets.randbelow(2**32) if seed is None else seed
    return build_jobs(lines, Settings(**settings_kw), seed, num_images, init_images), model


def _run(jobs, model, *, config, device, dtype, allow_unsafe_pickle, accel, out, overwrite, grid, batch_size,
         as_json, quiet, lora=None, lora_scale=1.0, vae_tiling="auto"):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ldm_cli.generate import Output, generate, load

    err = Console(stderr=True, quiet=quiet)
    show_progress = not quiet and err.is_terminal  # bars in a log file are noise
    with err.status("loading model", spinner="dots") if show_progress else nullcontext():
        components = load(model, device, dtype, allow_unsafe_pickle, config, accel, lora, lora_scale, vae_tiling)
    output = Output(out, overwrite=overwrite, grid=grid)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=False, disable=not show_progress) as progress:
        images_task = progress.add_task("images", total=len(jobs), rate="")
        steps_task = progress.add_task("steps", total=None, rate="")
        clock = {"t": None}

        def on_step(done, total):
            import time

            now = time.perf_counter()
            if done == 1:
                clock["t"] = now
            rate = f"{(done - 1) / (now - clock['t']):.2f} it/s" if done > 1 and now > clock["t"] else ""
            progress.update(steps_task, completed=done, total=total, rate=rate)

        written = generate(components, jobs, output, batch_size,
                           on_image=lambda w: progress.advance(images_task), on_step=on_step)
    if as_json:
        print(json.dumps([w.to_dict() for w in written], indent=2))
    elif not quiet:
        for w in written:
            err.print(f"wrote {w.path}", highlight=False)


@app.command()
def sample(
    prompt: Annotated[Optional[list[str]], typer.Argument(help="Prompt(s); each is its own request.")] = None,
    prompt_file: PromptFile = None,
    from_png: Annotated[Optional[Path], typer.Option(help="Redo the image this ldm PNG was made with.")] = None,
    steps: Steps = 50, cfg: Cfg = 7.5, negative: Negative = "", seed: Seed = None, num_images: NumImages = 1,
    batch_size: BatchSize = 1, width: Width = None, height: Height = None, eta: Eta = 0.0,
    model: Model = None, config: Config = None, device: Device = "auto", dtype: Dtype = "auto",
    allow_unsafe_pickle: Unsafe = False, accel: Accel = "auto", lora: Lora = None, lora_scale: LoraScale = 1.0,
    vae_tiling: VaeTiling = "auto", out: Out = Path("outputs"), grid: Grid = False,
    overwrite: Overwrite = False, as_json: JsonOut = False, quiet: Quiet = False, debug: Debug = False,
):
    """Generate images from text."""
    kw = dict(steps=steps, cfg=cfg, eta=eta, width=width, height=height, negative=negative)
    jobs, model = _jobs_and_model(prompt, prompt_file, from_png, kw, seed, num_images, model)
    _run(jobs, model, config=config, device=device, dtype=dtype, allow_unsafe_pickle=allow_unsafe_pickle, accel=accel,
         out=out, overwrite=overwrite, grid=grid, batch_size=batch_size, as_json=as_json, quiet=quiet,
         lora=lora, lora_scale=lora_scale, vae_tiling=vae_tiling)


@app.command()
def img2img(
    image: Annotated[Path, typer.Argument(help="Starting image, or a folder of them.")],
    prompt: Annotated[Optional[list[str]], typer.Argument(help="Prompt(s).")] = None,
    strength: Annotated[float, typer.Option(help="0..1: how much of the image is replaced (1 = all).")] = 0.75,
    prompt_file: PromptFile = None,
    steps: Steps = 50, cfg: Cfg = 7.5, negative: Negative = "", seed: Seed = None, num_images: NumImages = 1,
    batch_size: BatchSize = 1, width: Width = None, height: Height = None, eta: Eta = 0.0,
    model: Model = None, config: Config = None, device: Device = "auto", dtype: Dtype = "auto",
    allow_unsafe_pickle: Unsafe = False, accel: Accel = "auto", lora: Lora = None, lora_scale: LoraScale = 1.0,
    vae_tiling: VaeTiling = "auto", out: Out = Path("outputs"), grid: Grid = False,
    overwrite: Overwrite = False, as_json: JsonOut = False, quiet: Quiet = False, debug: Debug = False,
):
    """Generate images starting from an image (SDEdit)."""
    from ldm_cli.images import list_images

    kw = dict(steps=steps, cfg=cfg, eta=eta, width=width, height=height, negative=negative, strength=strength)
    init_images = list_images(image)
    jobs, model = _jobs_and_model(prompt, prompt_file, None, kw, seed, num_images, model, init_images)
    _run(jobs, model, config=config, device=device, dtype=dtype, allow_unsafe_pickle=allow_unsafe_pickle, accel=accel,
         out=out, overwrite=overwrite, grid=grid, batch_size=batch_size, as_json=as_json, quiet=quiet,
         lora=lora, lora_scale=lora_scale, vae_tiling=vae_tiling)


@app.command()
def info(
    model: Annotated[Optional[str], typer.Argument(help="Model to describe; default: the embedded model.")] = None,
    config: Config = None, allow_unsafe_pickle: Unsafe = False, as_json: JsonOut = False, debug: Debug = False,
):
    """Show a model's components, parameter counts, scheduler, dtype and size on disk."""
    from ldm_cli.generate import load
    from ldm_cli.model_info import describe

    facts = describe(load(model, "cpu", "auto", allow_unsafe_pickle, config))
    if as_json:
        print(json.dumps(facts, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=facts["model"], show_header=False)
    for key, value in facts.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    Console().print(table)


@app.command()
def train(
    data_dir: Annotated[Path, typer.Argument(help="Folder of images with .txt captions or metadata.jsonl/.csv.")],
    model: Model = None, out: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")] = Path("runs/train"),
    from_scratch: Annotated[bool, typer.Option(help="Train a new U-Net instead of fine-tuning the model's.")] = False,
    unet_config: Annotated[str, typer.Option(help="With --from-scratch: tiny, small, sd15 or a config.json.")] = "tiny",
    lora_rank: Annotated[int, typer.Option(help="Train LoRA adapters of this rank instead of the U-Net (0: off).")] = 0,
    lora_alpha: Annotated[float, typer.Option(help="LoRA alpha (0: the rank).")] = 0.0,
    resolution: Annotated[int, typer.Option(help="Training resolution in pixels.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Images per step and GPU.")] = 4,
    max_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (default 1000).")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Passes over the data, instead of --max-steps.")] = None,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-4,
    lr_scheduler: Annotated[str, typer.Option(help="constant, cosine, linear, ... (diffusers').")] = "constant",
    warmup_steps: Annotated[int, typer.Option(help="Learning-rate warm-up steps.")] = 0,
    optimizer: Annotated[str, typer.Option(help="adamw, or adamw8bit (needs bitsandbytes).")] = "adamw",
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm (0: off).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of data order, dropout and noise.")] = 0,
    mixed_precision: Annotated[str, typer.Option(help="no, fp16 or bf16.")] = "no",
    gradient_accumulation: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Less memory, ~30% slower.")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the U-Net.")] = False,
    caption_dropout: Annotated[float, typer.Option(help="Share of empty captions (for CFG).")] = 0.1,
    random_flip: Annotated[bool, typer.Option(help="Flip images left-right at random.")] = False,
    random_crop: Annotated[bool, typer.Option(help="Random instead of centre crops.")] = False,
    noise_offset: Annotated[float, typer.Option(help="Noise offset (0.05-0.1 helps dark/bright images).")] = 0.0,
    min_snr_gamma: Annotated[float, typer.Option(help="Min-SNR loss weighting gamma (0: off; 5 typical).")] = 0.0,
    ema: Annotated[bool, typer.Option("--ema", help="Keep an EMA of the weights; written to OUT/model-ema.")] = False,
    ema_decay: Annotated[float, typer.Option(help="EMA decay.")] = 0.9999,
    cache: Annotated[bool, typer.Option(help="Cache VAE latents and text embeddings on disk.")] = True,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Cache folder (default ~/.cache/ldm/latents).")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints (0: end only).")] = 0,
    keep_checkpoints: Annotated[int, typer.Option(help="Checkpoints kept.")] = 2,
    resume: Annotated[Optional[str], typer.Option(help="latest or a checkpoint folder.")] = None,
    validate_every: Annotated[int, typer.Option(help="Steps between validation grids (0: never).")] = 0,
    validation_prompt: Annotated[Optional[list[str]], typer.Option(help="Prompt for validation grids; repeat.")] = None,
    validation_steps: Annotated[int, typer.Option(help="DDIM steps of validation images.")] = 20,
    log_every: Annotated[int, typer.Option(help="Steps between log lines.")] = 10,
    gpus: Annotated[int, typer.Option(help="Processes (GPUs) to launch through accelerate.")] = 1,
    strict: Annotated[bool, typer.Option(help="Fail on unreadable or caption-less images.")] = False,
    device: Device = "auto", quiet: Quiet = False, debug: Debug = False,
):
    """Fine-tune (full or LoRA) or train from scratch a U-Net on a folder of captioned images."""
    from ldm_cli.generate import default_model
    from ldm_cli.train import TrainConfig
    from ldm_cli.train import train as run_training

    if gpus > 1:
        from ldm_cli.launch import launch

        raise typer.Exit(launch(gpus, mixed_precision, _ARGV))
    if max_steps is not None and epochs is not None:
        raise LdmError("give --max-steps or --epochs, not both")
    cfg = TrainConfig(data_dir=str(data_dir), model=model or default_model(), out_dir=str(out),
                      from_scratch=from_scratch, unet_config=unet_config, lora_rank=lora_rank, lora_alpha=lora_alpha,
                      resolution=resolution, batch_size=batch_size, max_steps=1000 if max_steps is None else max_steps,
                      epochs=epochs or 0.0, lr=lr, lr_scheduler=lr_scheduler, warmup_steps=warmup_steps,
                      optimizer=optimizer, max_grad_norm=max_grad_norm, seed=seed, mixed_precision=mixed_precision,
                      gradient_accumulation=gradient_accumulation, gradient_checkpointing=gradient_checkpointing,
                      compile=compile, caption_dropout=caption_dropout, random_flip=random_flip,
                      random_crop=random_crop, noise_offset=noise_offset, min_snr_gamma=min_snr_gamma, ema=ema,
                      ema_decay=ema_decay, cache=cache, cache_dir=str(cache_dir or ""),
                      checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                      validate_every=validate_every, validation_prompts=tuple(validation_prompt or ()),
                      validation_steps=validation_steps, log_every=log_every, strict=strict, device=device)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    err = Console(stderr=True, quiet=quiet)
    columns = [TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
               TimeRemainingColumn()]
    with Progress(*columns, console=err, disable=quiet or not err.is_terminal) as progress:
        task = progress.add_task("train", total=None, stats="")

        def report(r, total):
            stats = f"loss {r['loss']:.4f} lr {r['lr']:.2e} {r['images_per_s'] or 0:.1f} img/s"
            if progress.disable:
                if not quiet:
                    print(f"step {r['step']}/{total} {stats}", file=sys.stderr)
            else:
                progress.update(task, completed=r["step"], total=total, stats=stats)

        result = run_training(cfg, resume=resume, on_log=report,
                              say=lambda text: None if quiet else err.print(text, highlight=False, soft_wrap=True))
    print(result)


_ARGV: list[str] = []  # this process's arguments, for `train --gpus N` to hand on to accelerate's launcher


def main(argv: list[str] | None = None) -> None:
    global _ARGV
    argv = sys.argv[1:] if argv is None else argv
    _ARGV = list(argv)
    debug = "--debug" in argv or os.environ.get("LDM_DEBUG", "") not in ("", "0")
    try:
        code = app(args=argv, prog_name="ldm", standalone_mode=False)
    except LdmError as e:
        if debug:
            raise
        print(f"ldm: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except ClickException as e:  # typer's own parsing errors: bad option values, unknown options
        if debug:
            raise
        print(f"ldm: error: {e.format_message()} (see 'ldm --help')", file=sys.stderr)
        sys.exit(e.exit_code if e.exit_code else USAGE)
    except KeyboardInterrupt:
        print("ldm: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
