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


# `ldm info` on what is not a model: the facts checked against the file's own tensors, read here independently

def info(ldm_here, target):
    import json

    r = ldm_here("info", target, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_info_on_a_lora_run_and_file(ldm_here, runs):
    from safetensors.torch import load_file

    file = runs / "lora" / "lora" / "pytorch_lora_weights.safetensors"
    tensors = load_file(file)
    downs = [k for k in tensors if k.endswith(("lora.down.weight", "lora_A.weight"))]  # ours: diffusers' form
    facts = info(ldm_here, runs / "lora")
    assert facts["kind"] == "LoRA" and facts["made"].startswith("lora") and facts["checkpoints"] >= 1
    assert facts["modules"] == facts["u_net_modules"] == len(downs) > 0 and facts["text_encoder_modules"] == 0
    assert facts["rank"] == "4" and {tensors[k].shape[0] for k in downs} == {4}
    assert info(ldm_here, file) == {k: v for k, v in facts.items() if k not in ("run", "made", "checkpoints")}


def test_info_on_a_kohya_lora_and_embeddings(ldm_here, runs, tmp_path):
    import torch
    from safetensors.torch import save_file

    kohya = {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(8, 32),
             "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 8),
             "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(4.0),
             "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(8, 768),
             "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 8)}
    save_file(kohya, tmp_path / "style.safetensors")
    facts = info(ldm_here, tmp_path / "style.safetensors")
    assert (facts["kind"], facts["format"], facts["rank"], facts["alpha_stored"]) == ("LoRA", "kohya (A1111)", "8", True)
    assert (facts["modules"], facts["u_net_modules"], facts["text_encoder_modules"]) == (2, 1, 1)
    save_file({"emb_params": torch.zeros(3, 768)}, tmp_path / "my-style.safetensors")  # A1111's form
    facts = info(ldm_here, tmp_path / "my-style.safetensors")
    assert (facts["kind"], facts["token"], facts["vectors"]) == ("textual-inversion embedding", "my-style", 3)
    assert facts["for"].startswith("Stable Diffusion 1.x")
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, tmp_path / "xl-cat.safetensors")
    facts = info(ldm_here, tmp_path / "xl-cat.safetensors")
    assert (facts["token"], facts["vectors"], facts["for"][:20]) == ("xl-cat", 2, "Stable Diffusion XL ")
    facts = info(ldm_here, runs / "ti")  # ours: the token names its one tensor; the tiny text encoder is 32 wide
    assert (facts["token"], facts["vectors"], facts["for"]) == ("zqx", 1, "a text encoder of width 32")


def test_info_on_pictures_and_on_a_model_run(ldm_here, runs, tiny_model, tmp_path):
    r = ldm_here("sample", "a red circle", "--model", tiny_model, "--steps", 2, "--seed", 9, "--device", "cpu",
                 "--out", tmp_path, "-q")
    assert r.returncode == 0, r.stderr
    (png,) = tmp_path.glob("*.png")
    facts = info(ldm_here, png)
    assert (facts["ldm"]["prompt"], facts["ldm"]["seed"], facts["size"]) == ("a red circle", 9, "64x64")
    assert "Seed: 9" in facts["parameters"] and facts["redo"] == f"ldm sample --from-png {png}"
    Image.new("RGB", (8, 8)).save(tmp_path / "bare.png")
    assert "none recorded" in info(ldm_here, tmp_path / "bare.png")["settings"]
    model = info(ldm_here, runs / "full")  # a full fine-tune's run: its model, sized without the checkpoints
    folder = runs / "full" / "model"
    assert model["family"] == "sd" and model["size_on_disk_bytes"] == sum(
        f.stat().st_size for f in folder.rglob("*") if f.is_file())
