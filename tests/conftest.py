import os
import random
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import save_tiny  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked slow (tens of seconds each) run first: the two workers of `make test` then share them, and the
    suite ends on short tests rather than one worker's long test beside an idle other. Tests marked gpu run only
    where CUDA is (the bench runner's GPU machine); elsewhere skipped."""
    import torch

    items.sort(key=lambda item: "slow" not in item.keywords)  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny epsilon-prediction SD model folder, saved with save_pretrained."""
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-eps")


@pytest.fixture
def unet(tiny_model):
    """The tiny model's U-Net, loaded fresh for each test (tests change its processors and layers)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_model / "unet").eval()


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


@pytest.fixture
def ldm_here(capsys):
    """`ldm` run in this process (`cli.main`, its output captured), for tests of what a command makes and
    says rather than of the process (signals, the console script, the launcher): a fresh process spends
    ~4 s importing torch, diffusers and transformers before it does anything. Returns what `run_ldm` does."""
    import contextlib
    import subprocess

    from ldm_cli import cli

    def run(*args, cwd=None):
        import torch

        capsys.readouterr()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as run_ldm's OMP_NUM_THREADS=1: results bitwise those of a subprocess
        try:
            with contextlib.chdir(cwd) if cwd else contextlib.nullcontext():
                cli.main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        finally:
            torch.set_num_threads(threads)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (230, 210, 40)}


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """32 images: a coloured circle or square on white, kohya-style .txt captions (and 2 bad files)."""
    root = tmp_path_factory.mktemp("shapes")
    rng = random.Random(0)
    for i in range(32):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(["circle", "square"])
        im = Image.new("RGB", (72, 64), "white")
        box = (16 + rng.randint(-4, 4), 12, 52 + rng.randint(-4, 4), 48)
        (ImageDraw.Draw(im).ellipse if shape == "circle" else ImageDraw.Draw(im).rectangle)(box, fill=COLOURS[colour])
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        im.save(sub / f"{i}.png")
        (sub / f"{i}.txt").write_text(f"a {colour} {shape}")
    Image.new("RGB", (64, 64)).save(root / "no-caption.png")
    return root


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny SDXL model folder (two text encoders, text_time addition embedding), save_pretrained."""
    from tiny import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_refiner(tmp_path_factory) -> Path:
    from tiny import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl-refiner", refiner=True, seed=2)
