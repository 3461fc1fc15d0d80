import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import save_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny epsilon-prediction SD model folder, saved with save_pretrained."""
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-eps")


@pytest.fixture(scope="session")
def tiny_v_model(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-v", prediction_type="v_prediction", seed=1)


LDM = str(Path(sys.executable).with_name("ldm"))


def run_ldm(*args, env=None, cwd=None):
    """Run the real console script in a subprocess; returns CompletedProcess with text output."""
    import subprocess

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([LDM, *map(str, args)], capture_output=True, text=True, env=full_env, cwd=cwd,
                          timeout=300)


@pytest.fixture
def ldm():
    return run_ldm
