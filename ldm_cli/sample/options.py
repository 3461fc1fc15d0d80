"""`OutputOptions` (where and how `ldm sample`'s images are written): torch-free, like `models.options`,
so that the CLI declares its options without importing the pipeline."""

from dataclasses import dataclass
from pathlib import Path

from ldm_cli.errors import check
from ldm_cli.options import check_ranges, option


@dataclass(frozen=True)
class OutputOptions:
    """Where and how the images are written and reported."""
    out: Path = option(Path("outputs"), "Output folder.", short="-o")
    grid: bool = option(False, "Also write a grid of all images.")
    overwrite: bool = option(False, "Number files from 0 and replace existing ones.")
    batch_size: int = option(1, "Images per U-Net batch.", min=1)
    as_json: bool = option(False, "Print written paths and parameters as JSON.", flag="json")
    quiet: bool = option(False, "No progress output.", short="-q")
    # a typo like --width 8192 on a CPU starts a job of hours: asked for once, not started silently
    yes: bool = option(False, "Start jobs above 2048x2048 pixels on a CPU (they take hours).")
    # a job is done when a PNG in --out records it (model, prompt, seed, settings): resumes a killed run
    skip_existing: bool = option(False, "With --seed: make only the images --out does not hold yet.")


def validate(out: OutputOptions) -> None:
    """Checked before the model loads. --out names a folder: `-o cat.png` made a folder called cat.png."""
    check_ranges(out)
    check(out.out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp") or out.out.exists(),
          f"--out {out.out}: --out is a folder (images are named NNNNN-SEED-PROMPT.png in it), not an image file; "
          f"give a folder, e.g. --out {out.out.parent / out.out.stem}")
