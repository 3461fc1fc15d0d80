"""What `ldm sample` and `ldm img2img` do once their arguments are parsed: load, make, write."""

import math
from dataclasses import dataclass, field
from pathlib import Path

from ldm_cli import images, pipeline
from ldm_cli.config import Job
from ldm_cli.errors import check
from ldm_cli.models import Components, load_components

PACKAGE_DIR = Path(__file__).parent
EMBEDDED_MODEL = PACKAGE_DIR / "embedded"


def default_model() -> str:
    check((EMBEDDED_MODEL / "model_index.json").is_file(),
          "no default model is installed yet; pass --model (a diffusers folder, a .safetensors file or a hub id)")
    return str(EMBEDDED_MODEL)


@dataclass
class Written:
    path: Path
    job: Job
    width: int
    height: int

    def to_dict(self) -> dict:
        return {"path": str(self.path), **self.job.to_dict(), "width": self.width, "height": self.height}


@dataclass
class Output:
    out_dir: Path
    overwrite: bool = False
    grid: bool = False
    written: list[Written] = field(default_factory=list)


def generate(c: Components, jobs: list[Job], out: Output, batch_size: int, on_image=None, on_step=None):
    """Make every job's image and write it; returns the Written records (grid last, if asked)."""
    check(batch_size >= 1, f"--batch-size must be >= 1, got {batch_size}")
    out_dir = images.ensure_dir(out.out_dir)
    jobs = [pipeline.resolve_size(c, j) for j in jobs]  # reads image headers: bad images fail before any work
    index = 0 if out.overwrite else images.next_index(out_dir)
    pils = []
    for job, image in pipeline.run_jobs(c, jobs, batch_size, on_step):
        pil = images.to_pil(image[None])[0]
        info = images.png_info(job, c.name, *pil.size, lora=c.lora)
        name = f"{job.seed}-{images.slug(job.prompt)}"
        path, index = images.write_image(pil, out_dir, name, info, out.overwrite, index)
        out.written.append(Written(path, job, *pil.size))
        pils.append(pil)
        if on_image is not None:
            on_image(out.written[-1])
    if out.grid and len(pils) > 1:
        check(len({p.size for p in pils}) == 1, "--grid needs images of one size")
        name = f"grid-{images.slug(out.written[0].job.prompt)}"
        images.write_image(images.grid(pils), out_dir, name, None, out.overwrite, index)
    return out.written


def load(model: str | None, device: str, dtype: str, allow_unsafe_pickle: bool, config: str | None,
         accel: str = "auto", lora: str | None = None, lora_scale: float = 1.0,
         vae_tiling: str = "auto") -> Components:
    from ldm_cli.accel import accelerate
    from ldm_cli.models import VAE_TILING

    check(vae_tiling in VAE_TILING, f"--vae-tiling must be auto, on or off, got {vae_tiling!r}")
    check(model is None or model.strip() != "", "--model is empty: give a folder, a .safetensors file or a hub id")
    c = load_components(model or default_model(), device=device, dtype=dtype,
                        allow_unsafe_pickle=allow_unsafe_pickle, config=config)
    if lora:
        from ldm_cli.lora import apply_lora

        check(math.isfinite(lora_scale), f"--lora-scale must be a finite number, got {lora_scale}")
        apply_lora(c, lora, lora_scale, allow_unsafe_pickle)
        c.lora = f"{lora}@{lora_scale:g}"
    c.vae_tiling = vae_tiling
    return accelerate(c, accel)
