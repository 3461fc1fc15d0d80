"""From what a command is given to the jobs it makes: prompts (and a prompt file) to jobs, a PNG's recorded job
redone with the command line's options over it, and the LoRAs the prompts' <lora:NAME:WEIGHT> tags name.
No UI here: `cli.py` calls these and prints."""

import logging
import secrets
from dataclasses import replace
from pathlib import Path

from ldm_cli.errors import LdmError


def with_prompt_loras(jobs, load, from_png):
    """The LoRAs the prompts' <lora:NAME:WEIGHT> tags name, found in --lora-dir, added to what is loaded;
    redoing a PNG, each LoRA file is checked against the hash it recorded (a different file: a warning)."""
    from ldm_cli.models.lora import file_hash, lora_file, parse_spec, prompt_loras

    found = prompt_loras([j.prompt for j in jobs if j.settings.prompt_syntax == "a1111"], load.lora_dir)
    load = replace(load, prompt_loras=found)
    if from_png is None:
        return load
    from ldm_cli.io.metadata import png_lora_hashes

    recorded = png_lora_hashes(from_png)
    given = [parse_spec(spec, 1.0)[0] for spec in load.lora]
    for path, name in [(p, Path(p).stem) for p in given] + [(path, name) for path, name, _ in found]:
        now = file_hash(lora_file(path, load.allow_unsafe_pickle))
        if name in recorded and recorded[name] != now:
            logging.getLogger("ldm").warning(f"warning: {path} (sha256 {now}...) is not the LoRA {name} {from_png} "
                                             f"was made with (sha256 {recorded[name]}...): the image will differ")
    return load


def redo_png(from_png, settings, request, load, given):
    """The job a PNG records, with the options given on the command line applied over it (and so
    recorded in the new PNG); its model unless --model is given. A LoRA it names must be given again."""
    from ldm_cli.io.metadata import NOT_RECORDED, png_embeddings, read_png_job
    from ldm_cli.jobs import build_jobs

    job, png_model, png_lora = read_png_job(from_png)
    if png_lora and not load.lora:
        raise LdmError(f"{from_png}: made with the LoRA(s) {png_lora}; paths in a PNG are not followed: pass "
                       f"--lora FILE:SCALE (once per LoRA) to redo it")
    named = png_embeddings(from_png) if png_model != NOT_RECORDED else ""
    if named and not load.embedding:
        raise LdmError(f"{from_png}: made with the embedding(s) {named}; paths in a PNG are not followed: pass "
                       "--embedding FILE:TOKEN (once each) to redo it")
    over = {f: getattr(settings, f) for f in settings.__dataclass_fields__ if f in given}
    seed = request.seed if "seed" in given else job.seed
    jobs = build_jobs([(job.prompt, over, "")], job.settings, seed, request.num_images)
    keep = "model" in given or png_model == NOT_RECORDED  # another tool's PNG names no model we can load
    return jobs, load if keep else replace(load, model=png_model)


def prompt_jobs(prompt, settings, request, init_images, skip_existing=False):
    """The jobs of the PROMPT arguments and the prompt file's lines, each with its own options over `settings`;
    seeds from --seed, else one drawn for the run."""
    from ldm_cli.io.prompts import read_prompt_file
    from ldm_cli.jobs import build_jobs

    lines = [(p, {}, "") for p in prompt or []]
    if request.prompt_file is not None:
        lines += read_prompt_file(request.prompt_file)
    if not lines:
        raise LdmError("no prompt: give PROMPT arguments or --prompt-file FILE")
    # an image is already made when a PNG records its seed: seeds drawn anew each run never match one
    if skip_existing and request.seed is None and not all("seed" in over for _, over, _ in lines):
        raise LdmError("--skip-existing needs --seed N (the seed of the run it completes): without it each run "
                       "draws new seeds, so no image is ever already made")
    seed = secrets.randbelow(2**32) if request.seed is None else request.seed
    return build_jobs(lines, settings, seed, request.num_images, init_images)
