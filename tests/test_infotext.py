"""A1111 infotext: written for every sampler and schedule, read back from A1111 / Forge PNGs."""

import json
import re

import pytest
from PIL import Image, PngImagePlugin

from ldm_cli.diffusion.names import SAMPLERS, SIGMA_SAMPLERS, from_a1111
from ldm_cli.errors import LdmError
from ldm_cli.io.infotext import parameters_text, parse_parameters
from ldm_cli.jobs import Job, Settings

# AUTOMATIC1111 v1.10's layout, with keys ldm ignores (hashes, an unknown "Foo bar" key, a quoted list)
A1111 = (
    "a red apple on a wooden table, (masterpiece)\n"
    "second prompt line\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 12, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, Size: 64x64, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Foo bar: 17, "
    'Lora hashes: "detail: 1a2b3c, style: 4d5e6f", Version: v1.10.1'
)


def a1111_png(path, text=A1111):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (64, 64), (120, 30, 30)).save(path, pnginfo=info)
    return path


def test_parse_a1111_infotext():
    job, model = parse_parameters(A1111)
    s = job.settings
    assert job.prompt == "a red apple on a wooden table, (masterpiece) second prompt line"
    assert (s.negative, s.steps, s.sampler, s.schedule, s.cfg) == ("blurry, lowres", 12, "dpm++2m", "karras", 6.5)
    assert (job.seed, s.width, s.height, model) == (3141592653, 64, 64, "v1-5-pruned-emaonly")


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("schedule", ["default", "karras", "exponential"])
def test_written_infotext_reads_back(sampler, schedule):
    if schedule != "default" and sampler not in SIGMA_SAMPLERS:
        return
    s = Settings(steps=9, cfg=3.5, width=64, height=48, negative="ugly", sampler=sampler, schedule=schedule)
    job = Job("a cat, wearing a hat", 77, s)
    text = parameters_text(job, "/models/tiny", 64, 48)
    assert f"Sampler: {SAMPLERS[sampler]}," in text
    assert ("Schedule type:" in text) == (schedule != "default")
    again, model = parse_parameters(text)
    assert again == job and model == "tiny"


def test_old_a1111_names_carry_the_schedule():
    assert from_a1111("DPM++ 2M Karras") == ("dpm++2m", "karras")
    assert from_a1111("DPM++ 2M SDE Exponential") == ("dpm++2m-sde", "exponential")
    assert from_a1111("DPM++ 3M SDE Karras") == ("dpm++3m-sde", "karras")
    assert from_a1111("DPM2 a Karras") == ("dpm2-a", "karras")
    assert from_a1111("LMS Karras") == ("lms", "karras")
    assert from_a1111("DPM++ 2M SDE Heun Exponential") == ("dpm++2m-sde-heun", "exponential")
    assert from_a1111("Euler a") == ("euler-a", "default")
    assert from_a1111("DDIM", "Karras") == ("ddim", "default")  # A1111 records one; DDIM has no sigma spacing


@pytest.mark.parametrize("name, nearest", [("DPM++ 2S a Karras", "euler-a"), ("PLMS", "ddim"),
                                           ("DPM++ SDE", "dpm++2m-sde"), ("Eulr", "euler")])
def test_unknown_sampler_names_the_nearest(name, nearest):
    with pytest.raises(LdmError, match=re.escape(f"nearest is --sampler {nearest} ")):
        from_a1111(name)


def test_from_png_reproduces_an_a1111_png(ldm_here, tiny_model, tmp_path):
    src = a1111_png(tmp_path / "a1111.png")
    r = ldm_here("sample", "--from-png", src, "--model", tiny_model, "--out", tmp_path / "out", "--json")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)[0]["path"]
    meta = json.loads(Image.open(made).text["ldm"])
    assert (meta["sampler"], meta["schedule"], meta["steps"], meta["cfg"]) == ("dpm++2m", "karras", 12, 6.5)
    assert (meta["seed"], meta["width"], meta["height"]) == (3141592653, 64, 64)
    assert meta["negative"] == "blurry, lowres" and meta["model"] == str(tiny_model)
    params = Image.open(made).text["parameters"]
    assert "Steps: 12, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653" in params


def test_from_png_unknown_sampler_is_one_line(ldm_here, tiny_model, tmp_path):
    src = a1111_png(tmp_path / "a1111.png", A1111.replace("Sampler: DPM++ 2M,", "Sampler: DPM++ 2S a,"))
    r = ldm_here("sample", "--from-png", src, "--model", tiny_model, "--out", tmp_path / "out")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "nearest is --sampler euler-a" in r.stderr
    assert not (tmp_path / "out").exists()
