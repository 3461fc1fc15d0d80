"""SDXL: ours equals diffusers' StableDiffusionXL(Img2Img)Pipeline on tiny random SDXL models (two text
encoders, text_time addition embedding; a refiner-shaped model for img2img), same seeds, fp32 CPU."""

import functools
import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from ldm_cli.io.images import pil_to_pixels
from ldm_cli.jobs import Settings
from ldm_cli.models.load import load_components
from ldm_cli.sample import pipeline

TOL = 1e-5
SCHEDULERS = {"ddim": (DDIMScheduler, {}), "euler": (EulerDiscreteScheduler, {}),
              "dpm++2m": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True})}


@functools.cache
def ours_loaded(model_dir):
    return load_components(str(model_dir), device="cpu", dtype="fp32")


@functools.cache
def reference(model_dir, cls):
    pipe = cls.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(pipe.scheduler.config)


def theirs(model_dir, cls, sampler, **kw):
    pipe, config = reference(model_dir, cls)
    scheduler_cls, extra = SCHEDULERS[sampler]
    pipe.scheduler = scheduler_cls.from_config(config, **extra)
    return pipe(generator=torch.Generator("cpu").manual_seed(kw.pop("seed")), output_type="np", **kw).images


def init_image():
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def test_loads_as_sdxl(tiny_sdxl, tiny_sdxl_refiner):
    c, r = ours_loaded(tiny_sdxl), ours_loaded(tiny_sdxl_refiner)
    assert (c.family, c.force_zeros_for_empty_prompt, c.requires_aesthetics_score) == ("sdxl", True, False)
    assert (r.family, r.text_encoder, r.requires_aesthetics_score) == ("sdxl-refiner", None, True)


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
@pytest.mark.parametrize("negative", ["", "blurry"])
def test_txt2img_matches_diffusers(tiny_sdxl, sampler, negative):
    s = Settings(steps=6, cfg=5.0, width=64, height=64, negative=negative, sampler=sampler,
                 schedule="karras" if sampler == "dpm++2m" else "default")
    ours = pipeline.txt2img(ours_loaded(tiny_sdxl), ["a red cat"], [negative], [7], s).permute(0, 2, 3, 1).numpy()
    ref = theirs(tiny_sdxl, StableDiffusionXLPipeline, sampler, prompt="a red cat", negative_prompt=negative or None,
                 num_inference_steps=6, guidance_scale=5.0, height=64, width=64, seed=7)
    assert ours.shape == ref.shape == (1, 64, 64, 3)
    assert np.abs(ours - ref).max() <= TOL


def test_micro_conditioning_matches_diffusers(tiny_sdxl):
    s = Settings(steps=5, cfg=6.0, width=64, height=64, original_size="128x96", crops_coords_top_left="8,4",
                 target_size="48x64")
    c = ours_loaded(tiny_sdxl)
    ours = pipeline.txt2img(c, ["a dog"], [""], [3], s).permute(0, 2, 3, 1).numpy()
    ref = theirs(tiny_sdxl, StableDiffusionXLPipeline, "ddim", prompt="a dog", num_inference_steps=5, guidance_scale=6.0,
                 height=64, width=64, original_size=(96, 128), crops_coords_top_left=(8, 4), target_size=(64, 48), seed=3)
    plain = pipeline.txt2img(c, ["a dog"], [""], [3], Settings(steps=5, cfg=6.0, width=64, height=64))
    assert np.abs(ours - ref).max() <= TOL
    assert np.abs(ours - plain.permute(0, 2, 3, 1).numpy()).max() > 100 * TOL  # the numbers reach the U-Net


@pytest.mark.parametrize("model", ["tiny_sdxl", "tiny_sdxl_refiner"])
@pytest.mark.parametrize("negative", ["", "ugly"])
def test_img2img_matches_diffusers(model, negative, request):
    folder = request.getfixturevalue(model)
    s = Settings(steps=10, cfg=5.0, width=64, height=64, strength=0.6, negative=negative)
    ours = pipeline.img2img(ours_loaded(folder), [pil_to_pixels(init_image(), 64, 64)], ["a red dog"], [negative], [5], s)
    ref = theirs(folder, StableDiffusionXLImg2ImgPipeline, "ddim", prompt="a red dog", image=init_image(),
                 negative_prompt=negative or None, strength=0.6, num_inference_steps=10, guidance_scale=5.0, seed=5)
    assert np.abs(ours.permute(0, 2, 3, 1).numpy() - ref).max() <= TOL


def test_cli_sample_and_info(ldm_here, tiny_sdxl, tiny_model, tmp_path):
    r = ldm_here("info", tiny_sdxl, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["family"] == "sdxl"
    r = ldm_here("sample", "a cat", "--model", tiny_sdxl, "--steps", 3, "--seed", 1, "--original-size", "128x128",
            "--out", tmp_path, "--json")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)[0]
    assert Image.open(made["path"]).size == (64, 64) and made["original_size"] == "128x128"
    r = ldm_here("sample", "a cat", "--model", tiny_model, "--steps", 1, "--original-size", "128x128", "--out", tmp_path)
    assert r.returncode == 2 and "not SDXL" in r.stderr and r.stderr.count("\n") == 1


def write_lora(unet_dir, out, sdxl):
    """A random rank-4 LoRA for this U-Net, in diffusers' file format."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from ldm_cli.models.lora import add_lora

    unet = UNet2DConditionModel.from_pretrained(unet_dir)
    add_lora(unet, 4)
    torch.manual_seed(0)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).save_lora_weights(
        out, unet_lora_layers=layers, safe_serialization=True)
    return out / "pytorch_lora_weights.safetensors"


def test_sdxl_lora_matches_diffusers_and_mismatches_are_one_line(ldm_here, tiny_sdxl, tiny_model, tmp_path):
    from ldm_cli.models.lora import apply_lora

    lora = write_lora(tiny_sdxl / "unet", tmp_path / "xl", sdxl=True)
    sd_lora = write_lora(tiny_model / "unet", tmp_path / "sd", sdxl=False)
    c = load_components(str(tiny_sdxl), device="cpu", dtype="fp32")
    apply_lora(c, str(lora), 0.8)
    s = Settings(steps=4, cfg=5.0, width=64, height=64)
    ours = pipeline.txt2img(c, ["a cat"], [""], [2], s).permute(0, 2, 3, 1).numpy()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipe.fuse_lora(lora_scale=0.8)
    ref = pipe("a cat", num_inference_steps=4, guidance_scale=5.0, height=64, width=64, output_type="np",
               generator=torch.Generator("cpu").manual_seed(2)).images
    plain = pipeline.txt2img(ours_loaded(tiny_sdxl), ["a cat"], [""], [2], s).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - ref).max() <= TOL and np.abs(ours - plain).max() > 100 * TOL
    for model, wrong in ((tiny_model, lora), (tiny_sdxl, sd_lora)):
        r = ldm_here("sample", "x", "--model", model, "--lora", wrong, "--steps", 1, "--out", tmp_path / "out")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--lora" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_sdxl_embedding_pair_matches_diffusers(tiny_sdxl, tmp_path):
    """An SDXL embedding file {clip_l, clip_g} (two vectors): ldm's image equals diffusers' pipeline after its
    documented two load_textual_inversion calls (clip_g into text_encoder_2, clip_l into text_encoder)."""
    from safetensors.torch import save_file

    from ldm_cli.models.options import LoadOptions
    from ldm_cli.sample.run import load

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    g = torch.Generator().manual_seed(0)
    widths = pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size
    pair = {"clip_l": torch.randn(2, widths[0], generator=g), "clip_g": torch.randn(2, widths[1], generator=g)}
    save_file(pair, tmp_path / "toyxl.safetensors")
    c = load(LoadOptions(model=str(tiny_sdxl), device="cpu", dtype="fp32", accel="none",
                         embedding=(str(tmp_path / "toyxl.safetensors"),))).components
    s = Settings(steps=4, cfg=5.0, width=64, height=64, prompt_syntax="plain")
    ours = pipeline.txt2img(c, ["a toyxl cat"], ["blurry"], [2], s).permute(0, 2, 3, 1).numpy()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_textual_inversion(pair["clip_g"], token="toyxl", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pipe.load_textual_inversion(pair["clip_l"], token="toyxl", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    ref = pipe("a toyxl cat", negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0, height=64,
               width=64, output_type="np", generator=torch.Generator("cpu").manual_seed(2)).images
    plain = pipeline.txt2img(ours_loaded(tiny_sdxl), ["a toyxl cat"], ["blurry"], [2], s).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - ref).max() <= TOL and np.abs(ours - plain).max() > 100 * TOL
    assert c.embeddings.startswith("toyxl@")


@pytest.mark.slow
def test_train_sdxl_full_and_lora_load_in_diffusers(shapes, tiny_sdxl, tmp_path):
    """Fine-tune and LoRA on a tiny SDXL: loss falls; diffusers' SDXL pipeline loads what was written and
    gives ldm's image; the micro-conditioning is the images' own (72x64 images: a 4-pixel centre crop)."""
    from ldm_cli.models.lora import apply_lora
    from ldm_cli.train.config import TrainConfig
    from ldm_cli.train.loop import train

    base = dict(data_dir=str(shapes), model=str(tiny_sdxl), batch_size=4, seed=1, device="cpu",
                cache_dir=str(tmp_path / "cache"))
    model_dir = train(TrainConfig(**base, out_dir=str(tmp_path / "full"), max_steps=40, lr=1e-3))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 40 and np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    s = Settings(steps=4, cfg=5.0, width=64, height=64)
    ours = pipeline.txt2img(load_components(str(model_dir), device="cpu"), ["a red circle"], [""], [4], s)
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    ref = pipe("a red circle", num_inference_steps=4, guidance_scale=5.0, height=64, width=64, output_type="np",
               generator=torch.Generator("cpu").manual_seed(4)).images
    assert np.abs(ours.permute(0, 2, 3, 1).numpy() - ref).max() <= TOL

    lora_dir = train(TrainConfig(**base, out_dir=str(tmp_path / "lora"), max_steps=10, lr=1e-2, lora_rank=4))
    c = load_components(str(tiny_sdxl), device="cpu", dtype="fp32")
    apply_lora(c, str(lora_dir))
    ours = pipeline.txt2img(c, ["a red circle"], [""], [4], s).permute(0, 2, 3, 1).numpy()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(lora_dir))
    pipe.fuse_lora()
    ref = pipe("a red circle", num_inference_steps=4, guidance_scale=5.0, height=64, width=64, output_type="np",
               generator=torch.Generator("cpu").manual_seed(4)).images
    plain = pipeline.txt2img(ours_loaded(tiny_sdxl), ["a red circle"], [""], [4], s).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - ref).max() <= TOL and np.abs(ours - plain).max() > 100 * TOL


def test_train_sdxl_resume_is_bitwise(shapes, tiny_sdxl, tmp_path):
    from ldm_cli.train.config import TrainConfig
    from ldm_cli.train.loop import train

    base = dict(data_dir=str(shapes), model=str(tiny_sdxl), batch_size=2, seed=3, device="cpu", max_steps=4,
                checkpoint_every=2, lr=1e-3, cache=False)  # uncached: the crop comes from the pixels' path
    whole = train(TrainConfig(**base, out_dir=str(tmp_path / "whole")))
    cut = TrainConfig(**{**base, "max_steps": 2}, out_dir=str(tmp_path / "cut"))
    train(cut)
    resumed = train(TrainConfig(**base, out_dir=str(tmp_path / "cut")), resume="latest")
    a = load_components(str(whole), device="cpu").unet.state_dict()
    b = load_components(str(resumed), device="cpu").unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_centre_crop_conditioning_matches_the_pixels(shapes):
    """The cached path's micro-conditioning (from the header) equals what loading the pixels records."""
    import random

    from ldm_cli.train.data import centre_crop_of, find_examples, load_pixels_and_crop

    ex = find_examples(shapes)[0][0]
    assert centre_crop_of(ex, 64) == load_pixels_and_crop(ex, 64, random.Random(0))[1] == (64, 72, 0, 4)
    assert centre_crop_of(ex, 48) == load_pixels_and_crop(ex, 48, random.Random(0))[1]


def test_train_refuses_what_it_cannot_train(shapes, tiny_sdxl, tiny_sdxl_refiner, tmp_path):
    from ldm_cli.errors import LdmError
    from ldm_cli.train.config import TrainConfig
    from ldm_cli.train.loop import train

    base = dict(data_dir=str(shapes), batch_size=2, device="cpu", max_steps=1, cache=False)
    with pytest.raises(LdmError, match="an SDXL refiner"):
        train(TrainConfig(**base, model=str(tiny_sdxl_refiner), out_dir=str(tmp_path / "a")))
    with pytest.raises(LdmError, match="--from-scratch builds an SD-1.x-shaped U-Net"):
        train(TrainConfig(**base, model=str(tiny_sdxl), from_scratch=True, unet_config="tiny",
                          out_dir=str(tmp_path / "b")))
    assert not (tmp_path / "a" / "model").exists() and not (tmp_path / "b" / "model").exists()


def test_sdxl_single_file_gives_the_folders_model_and_images(tmp_path, ldm):
    """A single-file SDXL checkpoint in Stability's layout (written here from a folder: tests/ldm_format.py),
    loaded with --config for the component configs: the family from its tensor names, every network's weights
    equal to the folder's, and the same image (to float noise). (The second encoder is wider than the first,
    as bigG is than ViT-L: diffusers' single-file loader tells them apart by width.)"""
    from ldm_format import write_sgm_checkpoint
    from tiny import build_sdxl_pipeline

    tiny_sdxl = tmp_path / "xl"
    build_sdxl_pipeline(tokenizer_dir=tmp_path / "tok", hidden_2=48).save_pretrained(tiny_sdxl)
    path = tmp_path / "xl.safetensors"
    write_sgm_checkpoint(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl), path)
    one, folder = load_components(str(path), device="cpu", config=str(tiny_sdxl)), load_components(str(tiny_sdxl),
                                                                                                   device="cpu")
    assert one.family == folder.family == "sdxl"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(one, name).state_dict(), getattr(folder, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b if k in a) and not set(b) - set(a) - {
            "text_model.embeddings.position_ids"}, name
    s = Settings(steps=3, cfg=5.0, width=64, height=64)
    ours = pipeline.txt2img(one, ["a red circle"], ["blurry"], [2], s)
    # equal to float noise, not bitwise: each file leaves its weights memory-mapped at offsets of its own, and
    # the CPU's vector kernels sum in another order for a tensor not 64-byte aligned
    assert (ours - pipeline.txt2img(folder, ["a red circle"], ["blurry"], [2], s)).abs().max() <= TOL
    r = ldm("info", path, "--config", tiny_sdxl, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["family"] == "sdxl", r.stderr


def test_kohya_sdxl_lora_equals_diffusers(tiny_sdxl, tmp_path):
    """A kohya-format SDXL LoRA: sd-scripts names the U-Net's modules by the SGM layout
    (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, written here from tests/ldm_format.py's
    mapping), the encoders `lora_te1_` / `lora_te2_`, alpha != rank. --lora FILE:0.8 equals diffusers'
    load_lora_weights + fuse_lora(0.8), its U-Net part equals the same LoRA in diffusers' format, and the
    encoders' part changes the image."""
    from ldm_format import unet_key
    from safetensors.torch import load_file, save_file

    from ldm_cli.models.lora import apply_lora

    diffusers_file = write_lora(tiny_sdxl / "unet", tmp_path / "d", sdxl=True)
    config = json.loads((tiny_sdxl / "unet" / "config.json").read_text())
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    alpha, unet_part = 2.0, {}
    for key, value in load_file(diffusers_file).items():
        module, kind = key.removeprefix("unet.").rsplit(".lora.", 1)
        sgm = unet_key(module + ".weight", config["layers_per_block"], up_has_attn).removesuffix(".weight")
        name = "lora_unet_" + sgm.replace(".", "_")
        unet_part[f"{name}.lora_{kind}"] = value * (4 / alpha) if kind == "up.weight" else value
        unet_part[f"{name}.alpha"] = torch.tensor(alpha)
    g = torch.Generator().manual_seed(3)
    encoders = {}
    for prefix, width in (("lora_te1", 32), ("lora_te2", 32)):
        for m in ("q_proj", "k_proj", "v_proj", "out_proj"):
            name = f"{prefix}_text_model_encoder_layers_0_self_attn_{m}"
            encoders.update({f"{name}.lora_down.weight": torch.randn(4, width, generator=g),
                             f"{name}.lora_up.weight": torch.randn(width, 4, generator=g) * 0.5,
                             f"{name}.alpha": torch.tensor(4.0)})
    save_file(unet_part, tmp_path / "k_unet.safetensors")
    save_file(unet_part | encoders, tmp_path / "k_both.safetensors")
    s = Settings(steps=4, cfg=5.0, width=64, height=64)

    def ours(path):
        c = load_components(str(tiny_sdxl), device="cpu", dtype="fp32")
        apply_lora(c, str(path), 0.8)
        return pipeline.txt2img(c, ["a cat"], ["blurry"], [2], s).permute(0, 2, 3, 1).numpy()

    both, unet_only = ours(tmp_path / "k_both.safetensors"), ours(tmp_path / "k_unet.safetensors")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(tmp_path), weight_name="k_both.safetensors")
    pipe.fuse_lora(lora_scale=0.8)
    ref = pipe("a cat", negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0, height=64, width=64,
               output_type="np", generator=torch.Generator("cpu").manual_seed(2)).images
    assert np.abs(both - ref).max() <= TOL
    assert np.abs(unet_only - ours(diffusers_file)).max() <= TOL
    assert np.abs(both - unet_only).max() > 100 * TOL


def test_sdxl_textual_inversion_trains_both_encoders_and_loads_in_diffusers(shapes, tiny_sdxl, tmp_path):
    """--textual-inversion on SDXL: the token in both encoders, each with vectors of its own width that move
    from the init word's; written as {clip_l, clip_g}; `--embedding` of it gives the image diffusers gives after
    its two load_textual_inversion calls; a stopped run resumes bitwise."""
    from safetensors.torch import load_file

    from ldm_cli.models.options import LoadOptions
    from ldm_cli.sample.run import load
    from ldm_cli.train.config import TrainConfig
    from ldm_cli.train.loop import train

    data = tmp_path / "stars"
    data.mkdir()
    for p in sorted(shapes.rglob("*.png"))[:4]:  # no captions: the instance prompt, by default the token
        (data / p.name).write_bytes(p.read_bytes())
    base = dict(data_dir=str(data), model=str(tiny_sdxl), textual_inversion="sks", init_word="circle",
                batch_size=2, lr=5e-2, seed=1, device="cpu", cache_dir=str(tmp_path / "c"))
    out = train(TrainConfig(**base, out_dir=str(tmp_path / "ti"), max_steps=6))
    pair = load_file(out / "sks.safetensors")
    c = load_components(str(tiny_sdxl), device="cpu")
    starts = [enc.get_input_embeddings().weight[tok("circle", add_special_tokens=False).input_ids[0]]
              for tok, enc in ((c.tokenizer, c.text_encoder), (c.tokenizer_2, c.text_encoder_2))]
    assert sorted(pair) == ["clip_g", "clip_l"]
    assert pair["clip_l"].shape == (1, c.text_encoder.config.hidden_size)
    assert pair["clip_g"].shape == (1, c.text_encoder_2.config.hidden_size)
    assert all((pair[k][0] - s).abs().max() > 1e-3 for k, s in zip(("clip_l", "clip_g"), starts))  # both trained
    s = Settings(steps=4, cfg=5.0, width=64, height=64, prompt_syntax="plain")
    emb = load(LoadOptions(model=str(tiny_sdxl), device="cpu", dtype="fp32", accel="none",
                           embedding=(str(out / "sks.safetensors"),))).components
    ours = pipeline.txt2img(emb, ["a sks"], [""], [2], s).permute(0, 2, 3, 1).numpy()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_textual_inversion(pair["clip_g"], token="sks", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pipe.load_textual_inversion(pair["clip_l"], token="sks", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    ref = pipe("a sks", num_inference_steps=4, guidance_scale=5.0, height=64, width=64, output_type="np",
               generator=torch.Generator("cpu").manual_seed(2)).images
    assert np.abs(ours - ref).max() <= TOL
    train(TrainConfig(**base, out_dir=str(tmp_path / "half"), max_steps=3))
    resumed = train(TrainConfig(**base, out_dir=str(tmp_path / "half"), max_steps=6), resume="latest")
    again = load_file(resumed / "sks.safetensors")
    assert all(torch.equal(again[k], pair[k]) for k in pair)
