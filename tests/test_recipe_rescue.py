"""The embedded model's recipe can rebuild its model folder from a checkpoint's EMA weights alone, as a
device call cut before the recipe's final stage returns them (recipes/tiny-emoji/assemble.py half, from-ema)."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm_cli.models.defaults import EMBEDDED_MODEL

ASSEMBLE = Path(__file__).parent.parent / "recipes" / "tiny-emoji" / "assemble.py"


def assemble():
    """recipes/tiny-emoji/assemble.py as a module: its stages called in this process (a fresh one spends ~7 s
    importing diffusers); its command line is run once, as a script, below."""
    spec = importlib.util.spec_from_file_location("assemble", ASSEMBLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_model_folder_is_rebuilt_from_a_checkpoints_ema(ldm_here, shapes, tiny_model, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = tmp_path / "run"
    r = ldm_here("train", shapes, "--model", tiny_model, "--out", run, "--max-steps", 3, "--batch-size", 2, "--lr",
                 1e-2, "--ema", "--ema-decay", 0.5, "--device", "cpu", "--cache-dir", tmp_path / "c")
    assert r.returncode == 0, r.stderr
    ema = run / "checkpoints" / "step-0000003" / "ema.safetensors"
    done = subprocess.run([sys.executable, str(ASSEMBLE), "half", ema, tmp_path / "ema16.safetensors"], env=env)
    assert done.returncode == 0
    assert all(v.dtype == torch.float16 for v in load_file(tmp_path / "ema16.safetensors").values())
    out = tmp_path / "rebuilt"
    recipe = assemble()
    recipe.from_ema(tmp_path / "ema16.safetensors", tiny_model, out)
    want = UNet2DConditionModel.from_pretrained(run / "model-ema" / "unet").half().state_dict()
    got = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    start = UNet2DConditionModel.from_pretrained(tiny_model / "unet").half().state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)  # the run's EMA model, in fp16
    assert any(not torch.equal(got[k], start[k]) for k in want)  # ... which training moved
    assert (out / "vae").is_dir() and (out / "text_encoder").is_dir() and (out / "model_index.json").is_file()
    shipped = (EMBEDDED_MODEL / "ldm_defaults.json").read_text()
    assert (out / "ldm_defaults.json").read_text() == shipped  # the family's cfg 5, not SD's 7.5
    # a from-scratch run's base comes back without its U-Net's weights (gpu_call.sh): the config makes it
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    for f in (base / "unet").glob("*.safetensors"):
        f.unlink()
    recipe.from_ema(tmp_path / "ema16.safetensors", base, tmp_path / "from-base")
    got = UNet2DConditionModel.from_pretrained(tmp_path / "from-base" / "unet").state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    # weights of another model are refused, not half-loaded
    from safetensors.torch import save_file

    weights = load_file(tmp_path / "ema16.safetensors")
    save_file(dict(list(weights.items())[1:]), tmp_path / "short.safetensors")
    with pytest.raises(SystemExit, match="not the EMA of"):
        recipe.from_ema(tmp_path / "short.safetensors", tiny_model, tmp_path / "x")
    assert not (tmp_path / "x").exists()
