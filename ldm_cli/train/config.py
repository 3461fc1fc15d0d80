"""`TrainConfig`: every training option once, with its default, help and range (the CLI is built from
it), its validation, and what a resumed run may change.

The config is saved in every checkpoint (config.json) as resolved at the start of the run (model,
resolution and step count filled in), so `--resume` can say what changed since.
"""

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ldm_cli.diffusion.names import SAMPLERS
from ldm_cli.errors import check
from ldm_cli.options import check_ranges, option

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
DEFAULT_MAX_STEPS = 1000


@dataclass(frozen=True)
class TrainConfig:
    data_dir: str = option("", "Folder of images with .txt captions or metadata.jsonl/.csv.", cli=False)
    # supplies the frozen VAE, text encoder, tokenizer, scheduler (and the U-Net to fine-tune); None: embedded
    model: str | None = option(None, "Diffusers folder, .safetensors file or hub id.", short="-m")
    out_dir: str = option("runs/train", "Run folder.", flag="out", short="-o")
    from_scratch: bool = option(False, "Train a new U-Net instead of fine-tuning the model's.")
    # a preset name or a UNet2DConditionModel config.json; only with from_scratch
    unet_config: str = option("tiny", "With --from-scratch: tiny, small, sd15 or a config.json.")
    lora_rank: int = option(0, "Train LoRA adapters of this rank instead of the U-Net (0: off).", min=0)
    lora_alpha: float = option(0.0, "LoRA alpha (0: the rank).", min=0.0, finite=True)  # scale = alpha / rank
    # a new token's input embedding is all that trains: the U-Net and text encoder stay frozen
    textual_inversion: str = option("", "Train an embedding for this new token instead of the U-Net.",
                                    metavar="TOKEN")
    init_word: str = option("", "With --textual-inversion: a word close to the concept, the starting point.")
    # more vectors hold more detail and need more images; A1111 and diffusers default to 1
    vectors: int = option(1, "With --textual-inversion: vectors of the embedding.", min=1, max=75)
    # images without a caption train on this text (with --textual-inversion, default: the token itself)
    instance_prompt: str = option("", "Caption of the images that have none.")
    # pixels of the square training crops; None: the model's native size (U-Net sample size x VAE factor)
    resolution: int | None = option(None, "Training resolution in pixels (default: the model's native size).")
    # auto: on unless every image's nearest bucket is the square (then nothing changes from square crops)
    buckets: str = option("auto", "Aspect-ratio buckets of about resolution^2 pixels: auto, on or off.",
                          choices=("auto", "on", "off"))
    # kohya's --min_bucket_reso/--max_bucket_reso/--bucket_reso_steps; None: resolution/2, 2x resolution, and
    # 64 px steps from 512 px up (resolution/8 below, so small models get more than one bucket)
    min_bucket_reso: int | None = option(None, "Smallest bucket side in pixels (default resolution/2).", min=8)
    max_bucket_reso: int | None = option(None, "Largest bucket side in pixels (default 2x resolution).", min=8)
    bucket_reso_steps: int | None = option(None, "Step of bucket sides in pixels (default 64; finer below 512).",
                                           min=8)
    # kohya's caption_prefix: a trigger word on every caption (before --shuffle-tags, so --keep-tokens counts it)
    caption_prefix: str = option("", "Text put before every caption.")
    # booru-style "tag, tag, tag" captions: a new tag order each step, so no tag owns a position
    shuffle_tags: bool = option(False, "Shuffle each caption's comma-separated tags every step.")
    keep_tokens: int = option(0, "With --shuffle-tags: leading tags that keep their place.", min=0)
    # DreamBooth prior preservation (Ruiz et al. 2023): the class keeps what it looked like before
    class_data: str = option("", "DreamBooth: folder of class images (generated into it with --num-class-images).")
    class_prompt: str = option("", "DreamBooth: caption of the class images (e.g. 'photo of a dog').")
    prior_loss_weight: float = option(1.0, "DreamBooth: weight of the class images' loss.", min=0.0, finite=True)
    # sampled with the model itself (the validation sampler and steps), seeded by index: resumable, reused
    num_class_images: int = option(0, "DreamBooth: make the class folder hold at least this many images.", min=0,
                                   max=100_000)
    # held out by a hash of each file's path: the same images whatever the seed
    validation_split: float = option(0.0, "Share of the data held out for the validation loss.", min=0.0, max=0.5,
                                     finite=True)
    validation_dir: str = option("", "Folder of images for the validation loss (instead of a split).")
    # Lin et al. 2024: rescaled betas so the last step is pure noise; needs v-prediction and trailing spacing
    zero_terminal_snr: bool = option(False, "Train with zero terminal SNR (v-prediction, trailing spacing).")
    batch_size: int = option(4, "Images per step and GPU.", min=1)  # per process: the global batch is x GPUs
    max_steps: int | None = option(None, f"Optimizer steps (default {DEFAULT_MAX_STEPS}).", min=1)
    epochs: float | None = option(None, "Passes over the data, instead of --max-steps.", min=0.0, min_open=True,
                                  finite=True)
    # None: the model's own for this kind of run (its ldm_defaults.json: the embedded model's), else 1e-4, or
    # 5e-3 with --textual-inversion (A1111's default there: one vector learns slowly)
    lr: float | None = option(None, "Learning rate (default: the model's own, else 1e-4; 5e-3 with "
                              "--textual-inversion).", min=0.0, min_open=True, finite=True)
    lr_scheduler: str = option("constant", "constant, cosine, linear, ... (diffusers').")
    warmup_steps: int = option(0, "Learning-rate warm-up steps.", min=0)
    optimizer: str = option("adamw", "adamw, or adamw8bit (needs bitsandbytes).", choices=("adamw", "adamw8bit"))
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0: off).", min=0.0, finite=True)
    seed: int = option(0, "Seed of data order, dropout and noise.", min=0)
    mixed_precision: str = option("no", "no, fp16 or bf16.", choices=("no", "fp16", "bf16"))  # accelerate's names
    gradient_accumulation: int = option(1, "Micro-batches per optimizer step.", min=1)
    # recompute activations in backward: less memory, ~30% slower
    gradient_checkpointing: bool = option(False, "Less memory, ~30% slower.")
    # keep convolutions', matmuls' and attention's outputs, recompute the rest (train/recompute.py)
    selective_checkpointing: bool = option(False, "About half the activation memory, recomputing only norms and "
                                           "pointwise ops; pays with --compile full.")
    # auto: full on CUDA for runs of >= 2000 steps (train/fast.py gives the measured break-even)
    # graphs: full + CUDA graphs, for small U-Nets whose steps the host cannot keep fed (one GPU, no accumulation)
    compile: str = option("auto", "torch.compile the U-Net: auto, none, regional (its repeated blocks), full, graphs.",
                          choices=("auto", "none", "regional", "full", "graphs"))
    # train the unconditional branch too, so classifier-free guidance works on the result
    caption_dropout: float = option(0.1, "Share of empty captions (for CFG).", min=0.0, max=1.0, finite=True)
    random_flip: bool = option(False, "Flip images left-right at random.")
    random_crop: bool = option(False, "Random instead of centre crops.")
    # adds offset * N(0, 1) per channel to the noise: lets the model learn overall brightness
    noise_offset: float = option(0.0, "Noise offset (0.05-0.1 helps dark/bright images).", min=0.0, finite=True)
    # Min-SNR-gamma loss weighting (Hang et al. 2023): tames the low-noise steps
    min_snr_gamma: float = option(0.0, "Min-SNR loss weighting gamma (0: off; 5 typical).", min=0.0, finite=True)
    ema: bool = option(False, "Keep an EMA of the weights; written to OUT/model-ema.")
    ema_decay: float = option(0.9999, "EMA decay.", min=0.0, max=1.0, min_open=True, finite=True)
    # VAE latents and text embeddings on disk (not with random crop/flip: every epoch sees new pixels)
    cache: bool = option(True, "Cache VAE latents and text embeddings on disk.", negatable=True)
    cache_dir: str | None = option(None, "Cache folder (default $LDM_CACHE_DIR/latents or ~/.cache/ldm/latents).")
    checkpoint_every: int = option(0, "Steps between checkpoints (0: end only).", min=0)
    keep_checkpoints: int = option(2, "Checkpoints kept.", min=1)
    validate_every: int = option(0, "Steps between validation grids and losses (0: the loss at the end only).", min=0)
    validation_prompts: tuple[str, ...] = option((), "Prompt for validation grids; repeat.", flag="validation-prompt")
    validation_steps: int = option(20, "Sampler steps of validation images.", min=1)
    # any of sample's samplers; the default keeps grids comparable with older runs
    validation_sampler: str = option("ddim", f"Sampler of validation images ({', '.join(SAMPLERS)}).",
                                     choices=tuple(SAMPLERS))
    # losses stay on the device in between: no host sync every step
    log_every: int = option(10, "Steps between log lines.", min=1)
    strict: bool = option(False, "Fail on unreadable or caption-less images.")
    # a new run in an --out that holds one: its checkpoints, model and log are replaced (only ldm's files)
    overwrite: bool = option(False, "Start over in an --out that already holds a run (replaces its outputs).")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps.")


def validate_config(cfg: TrainConfig) -> None:
    """Every option, before any model is loaded or file written (options used late in a run too)."""
    check_ranges(cfg)
    check(cfg.max_steps is None or cfg.epochs is None, "give --max-steps or --epochs, not both")
    check(cfg.ema_decay < 1, f"--ema-decay must be in (0, 1), got {cfg.ema_decay}")
    check(cfg.resolution is None or (cfg.resolution >= 8 and cfg.resolution % 8 == 0),
          f"--resolution must be a multiple of 8, got {cfg.resolution}")
    check(not (cfg.lora_rank and cfg.from_scratch), "--lora-rank adapts an existing U-Net: drop --from-scratch")
    check(cfg.data_dir != "", "no data folder given: ldm train DATA_DIR, or data_dir in --config")
    check(Path(cfg.data_dir).is_dir(), f"{cfg.data_dir}: data folder not found")  # a typo: told before any import
    ti = cfg.textual_inversion
    check(not ti or cfg.init_word.strip(), "--textual-inversion needs --init-word WORD (a word close to the "
          "concept, e.g. 'dog'), the embedding's starting point")
    check(not (cfg.init_word or cfg.vectors > 1) or ti, "--init-word and --vectors go with --textual-inversion TOKEN")
    check(not ti or not any(ch in ti for ch in ' ,:/\\<>"|?*()[]'), f"--textual-inversion {ti!r}: a token is one "
          "word of letters, digits, '-' or '_' (it names the file too), e.g. 'sks-dog'")  # before OUT is made
    check(not ti or not (cfg.lora_rank or cfg.from_scratch),
          "--textual-inversion trains an embedding for a frozen model: drop --lora-rank / --from-scratch")
    check(not cfg.keep_tokens or cfg.shuffle_tags, "--keep-tokens goes with --shuffle-tags")
    check(not (cfg.gradient_checkpointing and cfg.selective_checkpointing), "give --gradient-checkpointing (all "
          "recomputed) or --selective-checkpointing (norms and pointwise ops recomputed), not both")
    check(cfg.ema or cfg.ema_decay == TrainConfig.ema_decay, "--ema-decay goes with --ema")
    check(cfg.lora_rank or not cfg.lora_alpha, "--lora-alpha goes with --lora-rank N")
    check(not (cfg.warmup_steps and cfg.lr_scheduler == "piecewise_constant"),  # before any caching; optim.py too
          "--warmup-steps does not apply to --lr-scheduler piecewise_constant: drop one of them")
    check(not (cfg.validation_split and cfg.validation_dir), "give --validation-split or --validation-dir, not both")
    dreambooth = cfg.class_data or cfg.class_prompt or cfg.num_class_images
    check(not dreambooth or (cfg.class_data and cfg.class_prompt.strip()), "DreamBooth needs both --class-data DIR "
          "and --class-prompt TEXT (e.g. 'photo of a dog')")
    check(not (dreambooth and ti), "--class-data (DreamBooth) trains the U-Net: drop --textual-inversion")
    check(dreambooth or cfg.prior_loss_weight == TrainConfig.prior_loss_weight,
          "--prior-loss-weight goes with --class-data DIR and --class-prompt TEXT (DreamBooth)")
    check(not cfg.zero_terminal_snr or not (cfg.lora_rank or ti), "--zero-terminal-snr changes the model's noise "
          "schedule and prediction type, which a LoRA or an embedding file cannot carry: train the whole U-Net")
    texts = cfg.instance_prompt + ti + cfg.init_word + cfg.caption_prefix + cfg.class_prompt
    check("\x00" not in texts, "--instance-prompt / --textual-inversion / --init-word / --caption-prefix / "
          "--class-prompt: contains a NUL byte")


def validate_for_model(cfg: TrainConfig, num_train_timesteps: int) -> None:
    """What can only be checked once the model is known, still before the first step."""
    check(cfg.validation_sampler != "lcm" or cfg.validation_steps <= 50, "--validation-steps: the lcm sampler "
          f"takes at most 50 steps, got {cfg.validation_steps}")
    check(cfg.validation_steps <= num_train_timesteps, f"--validation-steps must be between 1 and "
          f"{num_train_timesteps} (the model's training steps), got {cfg.validation_steps}")
    check(all(p.strip() and "\x00" not in p for p in cfg.validation_prompts),
          "--validation-prompt: empty, or contains a NUL byte")


def steps_for(cfg: TrainConfig, examples: int, world: int) -> int:
    """The optimizer steps of the run: --max-steps, or --epochs passes over `examples` images."""
    if cfg.epochs is None:
        return cfg.max_steps or DEFAULT_MAX_STEPS
    per_epoch = math.ceil(examples / (cfg.batch_size * world * cfg.gradient_accumulation))
    return math.ceil(cfg.epochs * per_epoch)


# ---- what a resumed run may change ---------------------------------------------------------------------
# A checkpoint continues one model: these must be as saved, or the resume is refused.
MUST_MATCH = ("model", "from_scratch", "unet_config", "lora_rank", "lora_alpha", "resolution", "optimizer",
              "textual_inversion", "init_word", "vectors", "zero_terminal_snr")
# The learning-rate schedule is rebuilt from the new values and positioned at the checkpoint's step.
SCHEDULE = ("lr", "lr_scheduler", "warmup_steps", "max_steps")
# Where the run is written, how often it logs, what it keeps: changes nothing in the numbers.
FREE = ("data_dir", "out_dir", "epochs", "device", "cache", "cache_dir", "checkpoint_every", "keep_checkpoints",
        "validate_every", "validation_prompts", "validation_steps", "validation_sampler", "log_every", "strict",
        "overwrite", "compile", "gradient_checkpointing", "selective_checkpointing")


def _same(key: str, old, new) -> bool:
    if key == "model" and old and new:
        return Path(old).expanduser().resolve() == Path(new).expanduser().resolve() or old == new
    if isinstance(old, list):
        old = tuple(old)
    return old == new


def resume_changes(saved: dict, cfg: TrainConfig) -> tuple[list[str], list[str], list[str]]:
    """(refused, schedule, other) changes between a checkpoint's saved config and this run's, each as
    'name old -> new'. Keys the saved config lacks (older checkpoints) are taken as unchanged."""
    new = asdict(cfg)
    changed = [f.name for f in fields(TrainConfig)
               if f.name in saved and f.name not in FREE and not _same(f.name, saved[f.name], new[f.name])]
    say = [f"{k} {saved[k]!r} -> {new[k]!r}" for k in changed]
    pick = [[s for k, s in zip(changed, say) if k in group] for group in (MUST_MATCH, SCHEDULE)]
    other = [s for k, s in zip(changed, say) if k not in MUST_MATCH and k not in SCHEDULE]
    return pick[0], pick[1], other
