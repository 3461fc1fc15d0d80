"""Jobs -> files: what `ldm sample` and `ldm img2img` do once their arguments are parsed: load the
model with its runner, make every job's image, write PNGs (and the grid) with their metadata."""

from dataclasses import dataclass, replace
from pathlib import Path

from ldm_cli.errors import check
from ldm_cli.io import images, metadata
from ldm_cli.io.files import ensure_dir
from ldm_cli.jobs import Job
from ldm_cli.models.components import Components, LoadOptions, validate
from ldm_cli.options import check_ranges, option
from ldm_cli.sample import pipeline


@dataclass(frozen=True)
class OutputOptions:
    """Where and how the images are written and reported."""
    out: Path = option(Path("outputs"), "Output folder.", short="-o")
    grid: bool = option(False, "Also write a grid of all images.")
    overwrite: bool = option(False, "Number files from 0 and replace existing ones.")
    batch_size: int = option(1, "Images per U-Net batch.", min=1)
    as_json: bool = option(False, "Print written paths and parameters as JSON.", flag="json")
    quiet: bool = option(False, "No progress output.", short="-q")


@dataclass(frozen=True)
class Written:
    path: Path
    job: Job
    width: int
    height: int

    def to_dict(self) -> dict:
        return {"path": str(self.path), **self.job.to_dict(), "width": self.width, "height": self.height}


@dataclass(frozen=True)
class Loaded:
    """A model ready to sample: its components and the U-Net runner accel built for them."""
    components: Components
    unet: object  # f(x, t, context), see models.unet


def load(o: LoadOptions) -> Loaded:
    """Load the model, fuse the LoRA, build the runner: every LoadOptions field is used here."""
    from ldm_cli.accel import build_runner
    from ldm_cli.models.load import default_model, load_components

    validate(o)
    c = load_components(o.model or default_model(), device=o.device, dtype=o.dtype,
                        allow_unsafe_pickle=o.allow_unsafe_pickle, config=o.config)
    if o.lora:
        from ldm_cli.models.lora import apply_lora

        apply_lora(c, o.lora, o.lora_scale, o.allow_unsafe_pickle)
        c = replace(c, lora=f"{o.lora}@{o.lora_scale:g}")
    c = replace(c, vae_tiling=o.vae_tiling)
    return Loaded(c, build_runner(c, o.accel))


def generate(model: Loaded, jobs: list[Job], out: OutputOptions, on_image=None, on_step=None) -> list[Written]:
    """Make every job's image and write it; returns the Written records (grid last, if asked)."""
    check_ranges(out)
    c = model.components
    out_dir = ensure_dir(out.out)
    jobs = [pipeline.resolve_size(c, j) for j in jobs]  # reads image headers: bad images fail before any work
    index = 0 if out.overwrite else images.next_index(out_dir)
    written, pils = [], []
    for job, image in pipeline.run_jobs(c, model.unet, jobs, out.batch_size, on_step):
        pil = images.to_pil(image[None])[0]
        info = metadata.png_info(job, c.name, *pil.size, lora=c.lora)
        name = f"{job.seed}-{images.slug(job.prompt)}"
        path, index = images.write_image(pil, out_dir, name, info, out.overwrite, index)
        written.append(Written(path, job, *pil.size))
        pils.append(pil)
        if on_image is not None:
            on_image(written[-1])
    if out.grid and len(pils) > 1:
        check(len({p.size for p in pils}) == 1, "--grid needs images of one size")
        name = f"grid-{images.slug(written[0].job.prompt)}"
        images.write_image(images.grid(pils), out_dir, name, None, out.overwrite, index)
    return written
