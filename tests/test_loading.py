"""A model saved by the tests loads by folder, single file and local HF cache; pickles need consent."""

import shutil

import numpy as np
import pytest
import torch
from ldm_format import write_ldm_checkpoint
from PIL import Image
from tiny import build_pipeline

from ldm_cli.jobs import Settings
from ldm_cli.models.load import load_components
from ldm_cli.sample import pipeline


def sample(c):
    return pipeline.txt2img(c, ["a red cat"], [""], [3], Settings(steps=3, width=64, height=64))


def test_single_file_equals_folder(tmp_path):
    pipe = build_pipeline(tokenizer_dir=tmp_path / "tok", seed=5)
    pipe.save_pretrained(tmp_path / "folder", safe_serialization=True)
    write_ldm_checkpoint(pipe, tmp_path / "model.safetensors")
    folder = load_components(str(tmp_path / "folder"), device="cpu")
    single = load_components(str(tmp_path / "model.safetensors"), device="cpu", config=str(tmp_path / "folder"))
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # Same weights, bitwise; outputs to 1e-5 only: BLAS kernels can vary with the tensors' memory alignment.
    assert (sample(folder) - sample(single)).abs().max() <= 1e-5


def test_pickle_checkpoint_needs_consent(ldm_here, tmp_path):
    pipe = build_pipeline(tokenizer_dir=tmp_path / "tok", seed=6)
    pipe.save_pretrained(tmp_path / "folder", safe_serialization=True)
    write_ldm_checkpoint(pipe, tmp_path / "model.safetensors")
    from safetensors.torch import load_file

    torch.save({"state_dict": load_file(tmp_path / "model.safetensors")}, tmp_path / "model.ckpt")
    args = ("sample", "x", "--model", tmp_path / "model.ckpt", "--config", tmp_path / "folder", "--steps", 2,
            "--seed", 3, "--out", tmp_path / "out", "-q")
    refused = ldm_here(*args)
    assert refused.returncode == 2 and "--allow-unsafe-pickle" in refused.stderr
    assert not (tmp_path / "out").exists()
    allowed = ldm_here(*args, "--allow-unsafe-pickle")
    assert allowed.returncode == 0, allowed.stderr
    via_folder = ldm_here("sample", "x", "--model", tmp_path / "folder", "--steps", 2, "--seed", 3,
                     "--out", tmp_path / "ref", "-q")
    assert via_folder.returncode == 0, via_folder.stderr
    a = np.asarray(Image.open(next((tmp_path / "out").glob("*.png")))).astype(int)
    b = np.asarray(Image.open(next((tmp_path / "ref").glob("*.png")))).astype(int)
    assert np.abs(a - b).max() <= 1  # 8-bit rounding of outputs equal to ~1e-6


def test_pickle_only_folder_needs_consent(tmp_path, tiny_model):
    from safetensors.torch import load_file

    from ldm_cli.errors import LdmError

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model, folder)
    st = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(st), folder / "unet" / "diffusion_pytorch_model.bin")
    st.unlink()
    try:
        load_components(str(folder), device="cpu")
        raise AssertionError("a pickle-only folder loaded without consent")
    except LdmError as e:
        assert "--allow-unsafe-pickle" in str(e)
    c = load_components(str(folder), device="cpu", allow_unsafe_pickle=True)
    assert torch.equal(sample(c), sample(load_components(str(tiny_model), device="cpu")))


@pytest.mark.slow
def test_hub_id_from_offline_cache(ldm, ldm_here, tiny_model, tmp_path):
    """A populated HF cache (the layout huggingface_hub writes) serves `org/name` with HF_HUB_OFFLINE=1."""
    repo = tmp_path / "hub" / "models--tiny-org--tiny-sd"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    r = ldm("sample", "x", "--model", "tiny-org/tiny-sd", "--steps", 2, "--seed", 1, "--out", tmp_path / "a", "-q",
            env=env)
    assert r.returncode == 0, r.stderr
    r2 = ldm_here("sample", "x", "--model", tiny_model, "--steps", 2, "--seed", 1, "--out", tmp_path / "b", "-q")
    assert r2.returncode == 0, r2.stderr
    a = np.asarray(Image.open(next((tmp_path / "a").glob("*.png"))))
    assert np.array_equal(a, np.asarray(Image.open(next((tmp_path / "b").glob("*.png")))))
    missing = ldm("sample", "x", "--model", "tiny-org/absent", "--out", tmp_path / "c", env=env)
    assert missing.returncode == 2 and "HF_HUB_OFFLINE" in missing.stderr
