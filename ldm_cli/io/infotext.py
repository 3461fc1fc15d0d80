"""AUTOMATIC1111's "infotext", the `parameters` text chunk web UIs and image browsers read and write:

    a red apple on a table
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x512, Model: ...

We write it for every image, and read it back (`--from-png`) from PNGs made by A1111 / Forge that have
no `ldm` chunk: prompt, negative prompt, steps, sampler, schedule type, CFG scale, seed, size and
denoising strength; other keys (hashes, hires fix, versions) are ignored. The last line is the
settings line when it holds at least 3 `key: value` pairs (A1111's own rule, its re_param)."""

import json
import re
from pathlib import Path

from ldm_cli.diffusion.names import SAMPLERS, SCHEDULES, from_a1111
from ldm_cli.errors import LdmError, check
from ldm_cli.jobs import Job, Settings

PARAM = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
SIZE = re.compile(r"^(\d+)x(\d+)$")


def parameters_text(job: Job, model: str, width: int, height: int, lora: str = "") -> str:
    """A1111's `parameters` format for this job."""
    s = job.settings
    lines = [job.prompt]
    if s.negative:
        lines.append(f"Negative prompt: {s.negative}")
    fields = [f"Steps: {s.steps}", f"Sampler: {SAMPLERS[s.sampler]}"]
    if s.schedule != "default":
        fields.append(f"Schedule type: {SCHEDULES[s.schedule]}")
    fields += [f"CFG scale: {s.cfg}", f"Seed: {job.seed}", f"Size: {width}x{height}",
               f"Model: {Path(model).name or model}"]
    if s.sampler == "ddim":
        fields.append(f"Eta: {s.eta}")
    if s.clip_skip > 1:
        fields.append(f"Clip skip: {s.clip_skip}")
    if s.strength is not None:
        fields.append(f"Denoising strength: {s.strength}")
    if lora:
        fields.append(f"Lora: {lora}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def parse_parameters(text: str) -> tuple[Job, str]:
    """(job, model name) from an A1111 infotext. Raises LdmError for a text that is not one, or for a
    sampler/schedule ldm lacks (naming the nearest it has)."""
    *lines, last = text.strip().split("\n")
    pairs = PARAM.findall(last)
    check(len(pairs) >= 3, "no A1111 settings line (Steps: ..., Sampler: ..., Seed: ...)")
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    values = {k.strip(): _unquote(v.strip()) for k, v in pairs}
    check(prompt and "\n".join(prompt).strip(), "no prompt before the settings line")
    sampler, schedule = from_a1111(values.get("Sampler", "DDIM"), values.get("Schedule type"))
    settings = {"sampler": sampler, "schedule": schedule, "negative": " ".join(negative).strip()}
    for key, name, kind in (("Steps", "steps", int), ("CFG scale", "cfg", float),
                            ("Denoising strength", "strength", float), ("Eta", "eta", float),
                            ("Clip skip", "clip_skip", int)):
        if key in values:
            settings[name] = _number(values[key], kind, key)
    if "Size" in values:
        size = SIZE.match(values["Size"])
        check(size is not None, f"Size {values['Size']!r} is not WIDTHxHEIGHT")
        settings["width"], settings["height"] = int(size.group(1)), int(size.group(2))
    check("Seed" in values, "no Seed in the settings line")
    if settings.get("eta") is not None and sampler != "ddim":
        settings.pop("eta")  # A1111's "Eta" applies to its ancestral samplers too; ours to DDIM only
    job = Job(prompt=" ".join(p for p in prompt if p), seed=_number(values["Seed"], int, "Seed"),
              settings=Settings(**settings))
    return job, values.get("Model", "")


def _unquote(v: str) -> str:
    if len(v) >= 2 and v[0] == v[-1] == '"':
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def _number(v: str, kind, key: str):
    try:
        number = float(v)
    except ValueError:
        raise LdmError(f"{key} {v!r} is not a number") from None
    check(kind is float or number.is_integer(), f"{key} {v!r} is not an integer")
    return kind(number)
