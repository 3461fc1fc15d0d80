"""From folders to the examples a run trains and validates on: caption prefix, aspect-ratio buckets, the
held-out validation images, and DreamBooth's class images (generated with the model itself when missing).

Order of work: `check_folders` before any model is loaded (bad data fails before anything is written);
`arrange` once the model, and so the resolution, is known.
"""

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ldm_cli.errors import LdmError, check
from ldm_cli.io.images import IMAGE_SUFFIXES, image_size
from ldm_cli.train import buckets, data
from ldm_cli.train.config import TrainConfig

CLASS_NAME = "class-{:05d}.png"  # generated class image i, seed i: a second run finds and keeps it


@dataclass(frozen=True)
class Sets:
    train: list  # data.Example, each with its bucket (or None: the resolution square)
    held_out: list  # examples of the validation loss
    classes: list  # DreamBooth class examples


def class_images(cfg: TrainConfig) -> list[Path]:
    folder = Path(cfg.class_data)
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def check_folders(cfg: TrainConfig) -> None:
    """The validation and class folders, before anything is loaded."""
    if cfg.validation_dir:
        data.find_examples(cfg.validation_dir, cfg.strict)
    if cfg.class_data:
        folder = Path(cfg.class_data)
        check(not folder.exists() or folder.is_dir(), f"--class-data {cfg.class_data}: not a folder")
        check(folder.resolve() != Path(cfg.data_dir).resolve(), "--class-data is the data folder: the class images "
              "must be other pictures of the class, not the subject's")
        have = len(class_images(cfg)) if folder.is_dir() else 0
        check(have or cfg.num_class_images, f"--class-data {cfg.class_data}: no images in it; add some, or pass "
              "--num-class-images N to have the model draw them")


def _hash_order(e, root: str) -> str:
    """By the path inside the data folder: the same split however the folder is named or reached."""
    return hashlib.sha256(e.path.relative_to(root).as_posix().encode()).hexdigest()


def split(cfg: TrainConfig, examples: list) -> tuple[list, list]:
    """(train, held out): --validation-dir's images, or the --validation-split share of the data taken by a
    hash of each path (the same images whatever --seed), at least one each."""
    if cfg.validation_dir:
        return examples, data.find_examples(cfg.validation_dir, cfg.strict)[0]
    if not cfg.validation_split:
        return examples, []
    check(len(examples) >= 2, f"--validation-split: {cfg.data_dir} has one image; nothing would be left to train on")
    n = min(len(examples) - 1, max(1, round(cfg.validation_split * len(examples))))
    held = {e.path for e in sorted(examples, key=lambda e: _hash_order(e, cfg.data_dir))[:n]}
    return [e for e in examples if e.path not in held], [e for e in examples if e.path in held]


def with_buckets(cfg: TrainConfig, examples: list, skipped: list[str], say) -> list:
    """The examples with their bucket (--buckets on, or auto and some image is not nearest the square);
    unreadable headers are skipped as unreadable images are. One line, exit 2, for an image with no bucket."""
    if cfg.buckets == "off":
        return examples
    spec = spec_of(cfg)
    sizes = buckets.bucket_sizes(spec)
    placed = []
    for e in examples:
        try:
            size = image_size(e.path)
        except LdmError as err:
            check(not cfg.strict, f"{err}; fix it or drop --strict")
            skipped.append(str(err))
            continue
        b = buckets.assign(size, sizes)
        if b is None:
            wide, tall = max(sizes, key=lambda s: s[0] / s[1]), min(sizes, key=lambda s: s[0] / s[1])
            raise LdmError(f"{e.path}: {size[0]}x{size[1]} has no bucket (the widest is {wide[0]}x{wide[1]}, the "
                           f"tallest {tall[0]}x{tall[1]}; more would be cropped than the rounding): raise "
                           "--max-bucket-reso or lower --min-bucket-reso, crop the image, or train with --buckets off")
        placed.append(replace(e, bucket=b))
    check(placed != [], f"{cfg.data_dir}: no readable images")
    square = (spec.resolution // spec.step * spec.step,) * 2
    if cfg.buckets == "auto" and all(e.bucket == square for e in placed) and square[0] == spec.resolution:
        return [replace(e, bucket=None) for e in placed]  # all square: as without buckets
    say(f"buckets: {buckets.histogram([e.bucket for e in placed])}")
    return placed


def spec_of(cfg: TrainConfig) -> buckets.BucketSpec:
    spec = buckets.default_spec(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps)
    buckets.check_spec(spec)
    return spec


def arrange(cfg: TrainConfig, c, examples: list, skipped: list[str], say) -> Sets:
    """The run's examples, once the resolution is known: prefix, split, buckets, class images."""
    if cfg.caption_prefix:
        examples = [replace(e, caption=cfg.caption_prefix + e.caption) for e in examples]
    train, held = split(cfg, examples)
    train = with_buckets(cfg, train, skipped, say)
    held = with_buckets(cfg, held, skipped, lambda _: None) if held else []
    classes = []
    if cfg.class_data:
        make_class_images(cfg, c, say)
        found, _ = data.find_examples(cfg.class_data, cfg.strict, cfg.class_prompt)
        classes = with_buckets(cfg, found, skipped, lambda text: say(f"class images' {text}"))
    return Sets(train, held, classes)


def make_class_images(cfg: TrainConfig, c, say) -> None:
    """Fill --class-data up to --num-class-images with the model's own pictures of --class-prompt: image i is
    seed i, written atomically as class-NNNNN.png, so a stopped run resumes and a second run generates none."""
    from ldm_cli.io.images import save_png, to_pil
    from ldm_cli.jobs import Settings
    from ldm_cli.sample import pipeline

    folder = Path(cfg.class_data)
    folder.mkdir(parents=True, exist_ok=True)
    have = len(class_images(cfg))
    missing = [i for i in range(cfg.num_class_images) if not (folder / CLASS_NAME.format(i)).exists()]
    missing = missing[:max(0, cfg.num_class_images - have)]
    if not missing:
        return
    say(f"drawing {len(missing)} class images of {cfg.class_prompt!r} into {folder}")
    s = Settings(steps=cfg.validation_steps, width=cfg.resolution, height=cfg.resolution,
                 sampler=cfg.validation_sampler)
    c.unet.eval()
    for i in missing:
        with torch.no_grad():
            pic = pipeline.txt2img(c, [cfg.class_prompt], [""], [i], s)
        save_png(to_pil(pic)[0], folder / CLASS_NAME.format(i), None, False)
