"""Jobs -> files: what `ldm sample` and `ldm img2img` do once their arguments are parsed: load the
model with its runner, make every job's image, write PNGs (and the grid) with their metadata."""

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from ldm_cli.errors import RUNTIME, LdmError, check
from ldm_cli.io import images, metadata
from ldm_cli.io.files import ensure_dir
from ldm_cli.jobs import Job
from ldm_cli.models.components import Components
from ldm_cli.models.options import LoadOptions, validate
from ldm_cli.sample import pipeline
from ldm_cli.sample.options import OutputOptions
from ldm_cli.sample.options import validate as validate_output

log = logging.getLogger("ldm")
CPU_PIXELS = 2048 * 2048


@dataclass(frozen=True)
class Written:
    path: Path
    job: Job  # a grid's: its first image's job
    width: int
    height: int
    grid: bool = False

    def to_dict(self) -> dict:
        return {"path": str(self.path), **self.job.to_dict(), "width": self.width, "height": self.height,
                **({"grid": True} if self.grid else {})}


@dataclass(frozen=True)
class Loaded:
    """A model ready to sample: its components and the U-Net runner accel built for them."""
    components: Components
    unet: object  # f(x, t, context), see models.unet


def load(o: LoadOptions) -> Loaded:
    """Load the model, fuse the LoRA, build the runner: every LoadOptions field is used here."""
    from ldm_cli.accel import build_runner
    from ldm_cli.models.defaults import default_model
    from ldm_cli.models.load import load_components

    validate(o)
    c = load_components(o.model or default_model(), device=o.device, dtype=o.dtype,
                        allow_unsafe_pickle=o.allow_unsafe_pickle, config=o.config)
    c = replace(c, name=recorded_name(o.model))
    if o.lora or o.prompt_loras:
        c = fuse_loras(c, o)
    if o.embedding:
        from ldm_cli.models.embeddings import load_embeddings

        c = replace(c, embeddings=load_embeddings(c, o.embedding, o.allow_unsafe_pickle))
    c = replace(c, vae_tiling=o.vae_tiling)
    return Loaded(c, build_runner(c, o.accel))


def fuse_loras(c: Components, o: LoadOptions) -> Components:
    """Fuse the --lora files and the prompts' <lora:...> tags' files (in that order) into c; recorded as
    c.lora (the --lora ones, "file@scale#hash") and c.lora_hashes (all, "name: hash")."""
    from ldm_cli.models.lora import apply_loras, file_hash, lora_file, parse_spec

    given = [parse_spec(spec, o.lora_scale) for spec in ((o.lora,) if isinstance(o.lora, str) else o.lora)]
    loras = given + [(path, weight) for path, _, weight in o.prompt_loras]
    apply_loras(c, loras, o.allow_unsafe_pickle)
    hashes = [file_hash(lora_file(path, o.allow_unsafe_pickle)) for path, _ in loras]
    names = [Path(path).stem for path, _ in given] + [name for _, name, _ in o.prompt_loras]
    return replace(c, lora=", ".join(f"{path}@{scale:g}#{h}" for (path, scale), h in zip(given, hashes)),
                   lora_hashes=", ".join(f"{n}: {h}" for n, h in zip(names, hashes)))


def recorded_name(model: str | None) -> str:
    """The model as PNGs record it, so that --from-png redoes it anywhere: `embedded` for the embedded
    model (not its install path), an absolute path for a local file or folder, a hub id as given."""
    from ldm_cli.io.metadata import EMBEDDED
    from ldm_cli.models.defaults import EMBEDDED_MODEL

    if model is None or Path(model).expanduser().resolve() == EMBEDDED_MODEL.resolve():
        return EMBEDDED
    local = Path(model).expanduser()
    return str(local.resolve()) if local.exists() else model


class Stopped(KeyboardInterrupt):
    """Interrupted while making images: `made` of the run's images are on disk, every process's counted."""

    def __init__(self, made: int):
        super().__init__(made)
        self.made = made


def generate(model: Loaded, jobs: list[Job], out: OutputOptions, on_image=None, on_step=None,
             procs=None) -> list[Written]:
    """Make every job's image (this process's share of them, with `procs`: see sample/spread.py) and write it;
    returns the Written records (on the first process, everyone's, in the run's order; the grid last)."""
    from ldm_cli.sample import spread

    validate_output(out)
    c = model.components
    out_dir = ensure_dir(out.out)
    first = procs is None or procs.is_main_process
    if first:
        clean_stale_temp_files(out_dir)
    jobs = [pipeline.resolve_size(c, j) for j in jobs]  # reads image headers: bad images fail before any work
    check(not out.grid or len({(j.settings.width, j.settings.height) for j in jobs}) == 1,
          "--grid needs images of one size; drop --grid or give --width and --height")
    big = max(j.settings.width * j.settings.height for j in jobs)
    check(c.device.type != "cpu" or big <= CPU_PIXELS or out.yes, f"{big} pixels per image on the CPU: a job of "
          f"hours ({big // (512 * 512)}x a 512x512 image); pass --yes to start it, or use a GPU")
    if first:
        warn_about(c, jobs)

    def info(job, w, h):
        return metadata.png_info(job, c.name, w, h, lora=c.lora, embeddings=c.embeddings, lora_hashes=c.lora_hashes)

    made = lambda job: metadata.made_with(job, c.name, c.lora, c.embeddings, c.lora_hashes)  # noqa: E731
    run = spread.plan(jobs, out_dir, out.batch_size, out.overwrite, out.skip_existing, made, procs)
    if run.skipped and first:
        log.info(f"{run.skipped} of {len(jobs)} image(s) already in {out_dir} (--skip-existing): not made again")
    written = []
    try:
        for batch in run.mine():
            todo = [run.jobs[k] for k in batch]
            for k, (job, image) in zip(batch, pipeline.run_jobs(c, model.unet, todo, len(todo), on_step)):
                pil = images.to_pil(image[None])[0]
                written.append(Written(write(pil, run.paths[k], info(job, *pil.size), out.overwrite, procs), job,
                                       *pil.size))
                if on_image is not None:
                    on_image(written[-1], run.done(len(written)), len(run.jobs))
    except KeyboardInterrupt:
        raise Stopped(run.done(len(written))) from None
    written = sorted(spread.gather(written, procs), key=lambda w: int(w.path.name.split("-")[0]))
    if out.grid and len(written) > 1 and first:
        pils = [images.open_image(w.path) for w in written]
        path, _ = images.write_image(images.grid(pils), out_dir, f"grid-{images.slug(written[0].job.prompt)}",
                                     info(written[0].job, written[0].width, written[0].height), out.overwrite,
                                     images.next_index(out_dir))
        written.append(Written(path, written[0].job, *images.grid_size(pils), grid=True))
    return written


def write(pil, path: Path, info, overwrite: bool, procs) -> Path:
    """The image under the name the plan gave it. Alone, a name taken meanwhile (another program writing
    there) moves it to the next free number; one of several processes must keep its name."""
    if procs is None:
        index, name = path.name.split("-", 1)
        return images.write_image(pil, path.parent, name.removesuffix(".png"), info, overwrite, int(index))[0]
    try:
        return images.save_png(pil, path, info, overwrite)
    except FileExistsError:
        raise LdmError(f"{path}: already exists; is another program writing into {path.parent}?", RUNTIME) from None


def warn_about(c: Components, jobs: list[Job]) -> None:
    """One warning line each for what would surprise: prompts past the text encoder's limit (their
    end is cut), sizes far from the model's native one (it draws badly there)."""
    limit = c.tokenizer.model_max_length if c.tokenizer is not None else None
    cut = {t for j in jobs for t in (j.prompt, j.settings.negative) if t and j.settings.prompt_syntax == "plain"}
    for text in sorted(cut) if limit else ():
        n = len(c.tokenizer(text, truncation=False).input_ids)
        if n > limit:
            log.warning(f"warning: prompt {text[:40]!r}... is {n} tokens; the text encoder takes {limit}: "
                        f"the last {n - limit} are ignored")
    native = c.unet.config.sample_size * c.vae_scale
    for w, h in sorted({(j.settings.width, j.settings.height) for j in jobs}):
        if max(w, h) > 2 * native or min(w, h) < native // 2:
            log.warning(f"warning: {w}x{h} is far from this model's native {native}x{native}; expect poor images")


def clean_stale_temp_files(out_dir: Path, older_than_s: float = 600) -> None:
    """Hidden temp files of ours left by a killed process (`.NNNNN-*.png.*.tmp`), older than any write."""
    import time

    for tmp in out_dir.glob(".*.png.*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
        except OSError:
            pass
