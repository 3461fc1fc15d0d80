"""Bad input: one line on stderr naming the problem, the right exit code, no traceback, no partial file."""

import pytest
import torch

from ldm_cli import cli, pipeline


def files_in(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def make_cases(tmp, tiny_model):
    """(name, args, expected exit code, text the message must contain)."""
    (tmp / "empty.txt").write_text("# only a comment\n\n")
    (tmp / "latin1.txt").write_bytes("a caf\xe9 au lait\n".encode("latin-1"))
    (tmp / "notimage.png").write_text("this is not a PNG")
    (tmp / "blocker").write_text("a file where a folder should be")
    (tmp / "model.ckpt").write_bytes(b"\x80\x04not really a pickle")
    (tmp / "corrupt.safetensors").write_bytes(b"\xff" * 100)
    broken = tmp / "broken-model"
    broken.mkdir()
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        src = tiny_model / sub
        (broken / sub).mkdir()
        for f in src.iterdir():
            (broken / sub / f.name).write_bytes(f.read_bytes()[:200] if f.suffix == ".safetensors" else f.read_bytes())
    (broken / "model_index.json").write_text((tiny_model / "model_index.json").read_text())
    m = ("--model", tiny_model)
    return [
        ("missing model", ("sample", "x", "--model", tmp / "nope"), 2, "not found"),
        ("corrupt model folder", ("sample", "x", "--model", broken), 2, "could not load the model"),
        ("corrupt single file", ("sample", "x", "--model", tmp / "corrupt.safetensors"), 2, "not a valid .safetensors"),
        ("pickle refused", ("sample", "x", "--model", tmp / "model.ckpt"), 2, "--allow-unsafe-pickle"),
        ("width not multiple of 8", ("sample", "x", *m, "--width", 63), 2, "width must be a multiple of 8"),
        ("height not multiple of 8", ("sample", "x", *m, "--height", 100), 2, "height must be a multiple of 8"),
        ("steps < 1", ("sample", "x", *m, "--steps", 0), 2, "steps must be >= 1"),
        ("steps not a number", ("sample", "x", *m, "--steps", "many"), 2, "--steps"),
        ("strength 0", ("img2img", tmp / "notimage.png", "x", *m, "--strength", 0), 2, "strength must be in (0, 1]"),
        ("strength > 1", ("img2img", tmp / "notimage.png", "x", *m, "--strength", 1.5), 2, "strength must be in (0, 1]"),
        ("cfg nan", ("sample", "x", *m, "--cfg", "nan"), 2, "cfg must be a finite number"),
        ("cfg inf", ("sample", "x", *m, "--cfg", "inf"), 2, "cfg must be a finite number"),
        ("unreadable image", ("img2img", tmp / "notimage.png", "x", *m, "--steps", 2), 2, "cannot read image"),
        ("missing image", ("img2img", tmp / "nope.png", "x", *m), 2, "no such image"),
        ("empty prompt file", ("sample", "--prompt-file", tmp / "empty.txt", *m), 2, "no prompts"),
        ("invalid UTF-8", ("sample", "--prompt-file", tmp / "latin1.txt", *m), 2, "latin1.txt:1: not valid UTF-8"),
        ("no prompt", ("sample", *m), 2, "no prompt"),
        ("output not writable", ("sample", "x", *m, "--steps", 1, "--out", tmp / "blocker" / "sub"), 2,
         "output folder is not writable"),
        ("cuda absent", ("sample", "x", *m, "--device", "cuda"), 2, "CUDA is not available"),
        ("from-png not ldm", ("sample", "--from-png", tmp / "notimage.png"), 2, "cannot read PNG"),
    ]




@pytest.fixture(scope="module")
def cases(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("bad")
    return tmp, {c[0]: c[1:] for c in make_cases(tmp, tiny_model)}


NAMES = ["missing model", "corrupt model folder", "corrupt single file", "pickle refused", "width not multiple of 8",
         "height not multiple of 8", "steps < 1", "steps not a number", "strength 0", "strength > 1", "cfg nan",
         "cfg inf", "unreadable image", "missing image", "empty prompt file", "invalid UTF-8", "no prompt",
         "output not writable", "cuda absent", "from-png not ldm"]


@pytest.mark.parametrize("name", NAMES)
def test_bad_input(ldm, cases, name, tmp_path):
    tmp, table = cases
    args, code, text = table[name]
    out = tmp_path / "out"
    if "--out" not in args:
        args = (*args, "--out", out)
    r = ldm(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, r.stderr
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("ldm: error: ") and text in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert files_in(out) == []


def test_every_case_is_listed(cases):
    assert sorted(cases[1]) == sorted(NAMES)


def test_debug_shows_traceback(ldm, tmp_path):
    r = ldm("sample", "x", "--model", tmp_path / "nope", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr and "LdmError" in r.stderr


def test_out_of_memory_suggests_smaller_batch(monkeypatch, capsys, tiny_model, tmp_path):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(pipeline, "txt2img", oom)
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", "x", "--model", str(tiny_model), "-n", 4, "--batch-size", "4", "--out", str(tmp_path), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1
    assert len(err) == 1 and "out of memory at batch size 4" in err[0] and "--batch-size 1" in err[0]
    assert files_in(tmp_path) == []
