"""The real console script, end to end, on the tiny model."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def pngs(folder):
    return sorted(p for p in folder.iterdir() if p.suffix == ".png")


def pixels(path):
    return np.asarray(Image.open(path))


def test_sample_writes_png_with_metadata_and_json(ldm, tiny_model, tmp_path):
    r = ldm("sample", "a red cat", "--model", tiny_model, "--steps", 3, "--seed", 5, "--negative", "blurry",
            "--out", tmp_path, "--json")
    assert r.returncode == 0, r.stderr
    written = json.loads(r.stdout)
    assert [w["seed"] for w in written] == [5]
    path = tmp_path / "00000-5-a-red-cat.png"
    assert written[0]["path"] == str(path) and pngs(tmp_path) == [path]
    im = Image.open(path)
    assert im.size == (64, 64)
    params = im.text["parameters"].splitlines()
    assert params[0] == "a red cat" and params[1] == "Negative prompt: blurry"
    assert "Steps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: 5, Size: 64x64, Model: tiny-eps" in params[2]
    meta = json.loads(im.text["ldm"])
    assert meta["prompt"] == "a red cat" and meta["steps"] == 3 and meta["model"] == str(tiny_model)


def test_batch_invariance_and_from_png_bitwise(ldm_here, tiny_model, tmp_path):
    batch, single, redo = tmp_path / "batch", tmp_path / "single", tmp_path / "redo"
    r = ldm_here("sample", "a dog", "--model", tiny_model, "--steps", 4, "--eta", 0.5, "--seed", 10, "-n", 4,
            "--batch-size", 4, "--out", batch, "-q")
    assert r.returncode == 0, r.stderr
    r = ldm_here("sample", "a dog", "--model", tiny_model, "--steps", 4, "--eta", 0.5, "--seed", 12, "--out", single, "-q")
    assert r.returncode == 0, r.stderr
    made = pngs(batch)
    assert [p.name.split("-")[1] for p in made] == ["10", "11", "12", "13"]
    assert np.array_equal(pixels(made[2]), pixels(pngs(single)[0]))  # seed 12: 3rd of a batch == alone
    assert not np.array_equal(pixels(made[0]), pixels(made[1]))
    r = ldm_here("sample", "--from-png", made[3], "--out", redo, "-q")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(pixels(made[3]), pixels(pngs(redo)[0]))


def test_never_overwrites_unless_asked(ldm_here, tiny_model, tmp_path):
    args = ("sample", "x", "--model", tiny_model, "--steps", 1, "--seed", 1, "--out", tmp_path, "-q")
    assert ldm_here(*args).returncode == 0
    first = (tmp_path / "00000-1-x.png").read_bytes()
    assert ldm_here(*args, "--cfg", 2).returncode == 0
    assert [p.name for p in pngs(tmp_path)] == ["00000-1-x.png", "00001-1-x.png"]
    assert (tmp_path / "00000-1-x.png").read_bytes() == first
    assert ldm_here(*args, "--cfg", 3, "--overwrite").returncode == 0
    assert (tmp_path / "00000-1-x.png").read_bytes() != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_prompt_file_overrides_and_grid(ldm_here, tiny_model, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# two prompts\n\na red apple | seed=7 cfg=4 negative=blurry, dark\na cat face\n")
    out = tmp_path / "out"
    r = ldm_here("sample", "--prompt-file", f, "--model", tiny_model, "--steps", 2, "--seed", 100, "--out", out,
            "--grid", "--json")
    assert r.returncode == 0, r.stderr
    written = json.loads(r.stdout)
    assert [(w["prompt"], w["seed"], w["cfg"], w["negative"]) for w in written[:2]] == [
        ("a red apple", 7, 4.0, "blurry, dark"), ("a cat face", 100, 7.5, "")]
    grid = out / "00002-grid-a-red-apple.png"  # listed, with metadata, like the images
    assert written[2]["path"] == str(grid) and written[2]["grid"] and Image.open(grid).size == (128, 64)
    assert "ldm" in Image.open(grid).text


def test_img2img_folder(ldm_here, tiny_model, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (70, 64), colour).save(src / f"{i}.png")  # 70 -> rounded down to 64
    out = tmp_path / "out"
    r = ldm_here("img2img", src, "a red cat", "--model", tiny_model, "--steps", 4, "--strength", 0.5, "--seed", 3,
            "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    written = json.loads(r.stdout)
    assert [w["init_image"] for w in written] == [str(src / "0.png"), str(src / "1.png")]
    assert [Path(w["path"]).name for w in written] == ["00000-3-0-a-red-cat.png", "00001-3-1-a-red-cat.png"]
    assert all(Image.open(w["path"]).size == (64, 64) for w in written)
    assert "Denoising strength: 0.5" in Image.open(written[0]["path"]).text["parameters"]


def test_bare_ldm_prints_its_help_not_an_error(ldm_here):
    r = ldm_here()
    assert r.returncode == 2 and r.stderr.startswith("Usage: ldm") and "ldm: error" not in r.stderr, r.stderr
    assert all(name in r.stderr for name in ("sample", "img2img", "info", "train"))


def test_info(ldm_here, tiny_model):
    r = ldm_here("info", tiny_model, "--json")
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert facts["unet"].startswith("UNet2DConditionModel, 985,444 parameters")
    assert facts["prediction_type"] == "epsilon" and facts["native_size"] == "64px"
    assert facts["sampling_defaults"] is None  # no ldm_defaults.json


def test_phone_photo_orientation_and_file_mode(ldm_here, tiny_model, tmp_path):
    """EXIF orientation 6 (stored sideways): img2img works on the upright picture; files get the umask."""
    photo = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (80, 48), "red").save(photo, exif=exif)
    out = tmp_path / "out"
    r = ldm_here("img2img", photo, "x", "--model", tiny_model, "--steps", 2, "--seed", 1, "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    made = Path(json.loads(r.stdout)[0]["path"])
    assert Image.open(made).size == (48, 80)
    assert made.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_from_png_applies_given_options_and_redoes_the_embedded_model_anywhere(ldm_here, tmp_path):
    out = tmp_path / "out"
    r = ldm_here("sample", "cat face", "--steps", 2, "--seed", 3, "--out", out, "-q")
    assert r.returncode == 0, r.stderr
    first = out / "00000-3-cat-face.png"
    assert json.loads(Image.open(first).text["ldm"])["model"] == "embedded"  # no install path in the PNG
    r = ldm_here("sample", "--from-png", first, "--steps", 3, "--seed", 8, "-n", 2, "--out", out, "--json",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [(w["seed"], w["steps"], w["prompt"]) for w in json.loads(r.stdout)] == [(8, 3, "cat face"), (9, 3, "cat face")]
    r = ldm_here("sample", "--from-png", out / "00001-8-cat-face.png", "--out", tmp_path / "redo", "-q")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(pixels(out / "00001-8-cat-face.png"), pixels(tmp_path / "redo" / "00000-8-cat-face.png"))


def test_long_prompt_warns_and_stale_temp_files_go(ldm_here, tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".00000-1-x.png.abc.tmp"
    stale.write_bytes(b"")
    os.utime(stale, (1, 1))  # long ago
    r = ldm_here("sample", "cat " * 100, "--model", tiny_model, "--steps", 1, "--seed", 1, "--out", out, "-q",
            "--prompt-syntax", "plain")
    assert r.returncode == 0, r.stderr
    warning = [line for line in r.stderr.splitlines() if "tokens" in line]
    assert len(warning) == 1 and "the last" in warning[0] and "are ignored" in warning[0], r.stderr
    assert not stale.exists()
    r = ldm_here("sample", "cat " * 100, "--model", tiny_model, "--steps", 1, "--seed", 1, "--out", out, "-q")
    assert r.returncode == 0 and "tokens" not in r.stderr, r.stderr  # a1111 syntax: nothing is cut


def test_model_defaults_file(ldm_here, tiny_model, tmp_path):
    """A model folder's ldm_defaults.json sets the sampling defaults; a flag or a prompt-file key still wins;
    the images are those the same values give when typed."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "ldm_defaults.json").write_text(json.dumps({"cfg": 3.0, "steps": 3, "why": "a note"}))
    f = tmp_path / "p.txt"
    f.write_text("a red apple | cfg=4\na cat face\n")
    base = ("sample", "--model", model, "--seed", 5, "--json")
    r = ldm_here(*base, "--prompt-file", f, "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    written = json.loads(r.stdout)
    assert [(w["cfg"], w["steps"]) for w in written] == [(4.0, 3), (3.0, 3)]
    r = ldm_here(*base, "a cat face", "--cfg", 2, "--out", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    assert [(w["cfg"], w["steps"]) for w in json.loads(r.stdout)] == [(2.0, 3)]
    typed = ldm_here("sample", "a cat face", "--model", tiny_model, "--seed", 5, "--cfg", 3, "--steps", 3, "--out",
                tmp_path / "c", "-q")
    assert typed.returncode == 0, typed.stderr
    assert np.array_equal(pixels(written[1]["path"]), pixels(pngs(tmp_path / "c")[0]))
    assert not np.array_equal(pixels(written[0]["path"]), pixels(written[1]["path"]))
    info = ldm_here("info", model, "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["sampling_defaults"] == {"cfg": 3.0, "steps": 3}


@pytest.mark.parametrize("content, says", [('{"cfg": "high"}', "cfg must be a number"),
                                           ('{"seed": 3}', "'seed' is not a sampling setting"),
                                           ('{"steps": 0}', "steps must be >= 1"),
                                           ("[1, 2]", "expected a JSON object")])
def test_model_defaults_file_refused(ldm_here, tiny_model, tmp_path, content, says):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "ldm_defaults.json").write_text(content)
    r = ldm_here("sample", "x", "--model", model, "--out", tmp_path / "out")
    assert r.returncode == 2 and says in r.stderr and "ldm_defaults.json" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
