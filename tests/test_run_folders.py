"""`ldm train`'s output folder where its product is wanted: --model RUN, --lora RUN and --embedding RUN draw what
RUN/model, RUN/lora and RUN/embedding/TOKEN.safetensors draw; the wrong option, or a run that has not ended,
is one line that says which option to use or how to finish it; a bad token makes no OUT folder."""

import numpy as np
import pytest
from PIL import Image

from ldm_cli.train.config import TrainConfig
from ldm_cli.train.loop import train


@pytest.fixture(scope="module")
def runs(shapes, tiny_model, tmp_path_factory):
    """Three two-step runs on the tiny model: a full fine-tune, a LoRA, a textual inversion."""
    root = tmp_path_factory.mktemp("runs")
    base = dict(data_dir=str(shapes), model=str(tiny_model), max_steps=2, batch_size=2, lr=1e-2, seed=3,
                device="cpu", cache_dir=str(root / "cache"))
    train(TrainConfig(**base, out_dir=str(root / "full")))
    train(TrainConfig(**base, out_dir=str(root / "lora"), lora_rank=4))
    train(TrainConfig(**base, out_dir=str(root / "ti"), textual_inversion="zqx", init_word="square"))
    return root


def drawn(ldm_here, out, *args):
    r = ldm_here("sample", "a red zqx", "--steps", 3, "--seed", 5, "--device", "cpu", "--out", out, "-q", *args)
    assert r.returncode == 0, r.stderr
    (png,) = out.glob("*.png")
    return np.asarray(Image.open(png))


@pytest.mark.parametrize("option,kind,inside", [("--model", "full", "model"), ("--lora", "lora", "lora"),
                                                ("--embedding", "ti", "embedding/zqx.safetensors")])
def test_a_run_folder_draws_what_its_product_draws(ldm_here, runs, tiny_model, tmp_path, option, kind, inside):
    model = () if option == "--model" else ("--model", tiny_model)
    given = drawn(ldm_here, tmp_path / "run", *model, option, runs / kind)
    named = drawn(ldm_here, tmp_path / "product", *model, option, runs / kind / inside)
    plain = drawn(ldm_here, tmp_path / "plain", "--model", tiny_model)
    assert np.array_equal(given, named)
    assert np.abs(given.astype(int) - plain).max() > 0  # the run's product took part


@pytest.mark.parametrize("option,kind,says", [("--model", "lora", "made a LoRA"), ("--lora", "full", "made a model"),
                                              ("--embedding", "full", "made a model")])
def test_a_run_given_to_the_wrong_option_names_the_right_one(ldm_here, runs, tiny_model, tmp_path, option, kind, says):
    model = () if option == "--model" else ("--model", tiny_model)
    r = ldm_here("sample", "x", *model, option, runs / kind, "--device", "cpu", "--out", tmp_path)
    right = {"lora": "--lora", "full": "--model"}[kind]
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert says in r.stderr and f"give it with {right}" in r.stderr, r.stderr
    assert not list(tmp_path.glob("*.png"))


def test_a_run_that_has_not_ended_says_how_to_finish_it(ldm_here, runs, tmp_path):
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    (unfinished / "config.toml").write_text((runs / "full" / "config.toml").read_text())
    r = ldm_here("sample", "x", "--model", unfinished, "--device", "cpu", "--out", tmp_path / "o")
    assert r.returncode == 2 and "has written no model/ yet" in r.stderr and "--resume latest" in r.stderr, r.stderr


def test_a_bad_token_makes_no_out_folder(ldm_here, shapes, tiny_model, tmp_path):
    r = ldm_here("train", shapes, "--model", tiny_model, "--textual-inversion", "<zqx>", "--init-word", "square",
                 "--out", tmp_path / "ti", "--device", "cpu")
    assert r.returncode == 2 and "a token is one word" in r.stderr, r.stderr
    assert not (tmp_path / "ti").exists()
