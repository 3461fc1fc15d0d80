"""AUTOMATIC1111's prompt syntax: the parser, and the conditioning it gives, against tensors written here
from A1111's published description (wiki "Features": attention/emphasis, BREAK, infinite prompt length,
clip skip), on the tiny model's real text encoder."""

import functools
import json
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ldm_cli.errors import LdmError
from ldm_cli.jobs import Settings
from ldm_cli.models.codecs import encode_text
from ldm_cli.models.load import load_components
from ldm_cli.sample import pipeline
from ldm_cli.text.attention import parse
from ldm_cli.text.encode import chunks

R, S = 1.1, 1 / 1.1


@pytest.mark.parametrize("text, runs", [
    ("a cat", [("a cat", 1.0)]),
    ("a (red) cat", [("a ", 1.0), ("red", R), (" cat", 1.0)]),
    ("((big)) [[small]]", [("big", R * R), (" ", 1.0), ("small", S * S)]),
    ("(red:1.5) and (blue:0.5)", [("red", 1.5), (" and ", 1.0), ("blue", 0.5)]),
    ("((a (b:2)))", [("a ", R * R), ("b", 2 * R * R)]),
    (r"\(not\) \[emphasis\] \\", [(r"(not) [emphasis] \ ".strip(), 1.0)]),
    ("open (bracket to the end", [("open ", 1.0), ("bracket to the end", R)]),
    ("stray) closer]", [("stray) closer]", 1.0)]),
    ("a cat BREAK a dog", [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]),
    ("time: 5:30", [("time: 5:30", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parse(text, runs):
    got = parse(text)
    assert [t for t, _ in got] == [t for t, _ in runs]
    assert [w for _, w in got] == pytest.approx([w for _, w in runs], rel=1e-12)


@pytest.mark.parametrize("bad", ["(cat:-1)", "(cat:1.2.3)", "(cat:1000)"])
def test_bad_weights_are_one_line(bad):
    with pytest.raises(LdmError, match="prompt weight"):
        parse(bad)


@given(st.text(alphabet="ab ,:.()[]\\1-BREAK", max_size=60))
@settings(max_examples=300, deadline=None)
def test_parser_never_crashes(text):
    try:
        runs = parse(text)
    except LdmError as e:
        assert "prompt weight" in str(e) and "\n" not in str(e)
        return
    assert runs and all(isinstance(t, str) and (w > 0 or (t, w) == ("BREAK", -1.0)) for t, w in runs)


@functools.cache
def loaded(model_dir):
    return load_components(str(model_dir), device="cpu", dtype="fp32")


def expected(c, token_rows, weight_rows, clip_skip=1):
    """A1111's algorithm, written out: per chunk [BOS] tokens [EOS] padding, the encoder's states (clip
    skip: hidden_states[-n] through the final layer norm), times the weights, the mean restored."""
    tok, enc = c.tokenizer, c.text_encoder
    out = []
    for tokens, weights in zip(token_rows, weight_rows):
        pad = 75 - len(tokens)
        ids = torch.tensor([[tok.bos_token_id, *tokens, tok.eos_token_id] + [tok.pad_token_id] * pad])
        w = torch.tensor([[1.0, *weights, 1.0] + [1.0] * pad])
        o = enc(ids, output_hidden_states=True)
        z = o[0] if clip_skip == 1 else enc.final_layer_norm(o.hidden_states[-clip_skip])
        mean = z.mean()
        z = z * w.unsqueeze(-1)
        out.append(z * (mean / z.mean()))
    return torch.cat(out, dim=1)


def ids(c, text):
    return c.tokenizer(text, add_special_tokens=False).input_ids


def test_plain_prompts_are_unchanged(tiny_model):
    c = loaded(tiny_model)
    assert torch.equal(encode_text(c, ["a red cat"], "a1111"), encode_text(c, ["a red cat"], "plain"))


def test_emphasis_matches_the_algorithm(tiny_model):
    c = loaded(tiny_model)
    with torch.no_grad():
        got = encode_text(c, ["a (red:1.5) [cat]"], "a1111")
        a, red, cat = ids(c, "a "), ids(c, "red"), ids(c, " cat")
        want = expected(c, [a + red + cat], [[1.0] * len(a) + [1.5] * len(red) + [S] * len(cat)])
    assert got.shape == (1, 77, 32) and torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, encode_text(c, ["a red cat"], "a1111"), atol=1e-3)


def test_long_prompts_break_and_comma_backtrack(tiny_model):
    c = loaded(tiny_model)
    cat, comma, dog = ids(c, "cat")[0], ids(c, ",")[0], ids(c, "dog")[0]
    with torch.no_grad():
        # 100 tokens: chunks of 75 and 25, nothing dropped
        got = encode_text(c, ["cat " * 100], "a1111")
        assert got.shape == (1, 154, 32)
        assert torch.allclose(got, expected(c, [[cat] * 75, [cat] * 25], [[1.0] * 75, [1.0] * 25]), atol=1e-6)
        # BREAK: a chunk each side
        got = encode_text(c, ["cat cat BREAK dog"], "a1111")
        assert torch.allclose(got, expected(c, [[cat, cat], [dog]], [[1.0] * 2, [1.0]]), atol=1e-6)
        # a comma 10 tokens before the 75-token limit: the phrase after it moves to the next chunk
        text = "cat " * 64 + ", " + "dog " * 20
        rows = [[cat] * 64 + [comma], [dog] * 20]
        assert [t.index(c.tokenizer.eos_token_id) - 1 for t, _ in chunks(c.tokenizer, text)] == [65, 20]
        assert torch.allclose(encode_text(c, [text], "a1111"), expected(c, rows, [[1.0] * 65, [1.0] * 20]), atol=1e-6)
        # plain: cut at 77, as before
        assert encode_text(c, ["cat " * 100], "plain").shape == (1, 77, 32)


def test_clip_skip_on_prompt_and_negative(tiny_model):
    """--clip-skip 2 is the penultimate layer through the final layer norm, for the prompt and the negative
    prompt alike (A1111; diffusers' clip_skip applies to the prompt only)."""
    c = loaded(tiny_model)
    s = Settings(steps=2, width=64, height=64, negative="blurry", clip_skip=2)
    with torch.no_grad():
        cond, uncond = pipeline.encode_prompts(c, ["a red cat"], ["blurry"], s)
        want_c = expected(c, [ids(c, "a red cat")], [[1.0] * 3], clip_skip=2)
        want_u = expected(c, [ids(c, "blurry")], [[1.0] * len(ids(c, "blurry"))], clip_skip=2)
    assert torch.allclose(cond, want_c, atol=1e-6) and torch.allclose(uncond, want_u, atol=1e-6)
    assert not torch.allclose(cond, encode_text(c, ["a red cat"]), atol=1e-3)
    with pytest.raises(LdmError, match="this text encoder has 2 layers"):
        encode_text(c, ["x"], clip_skip=3)


def test_guidance_halves_padded_to_one_length(tiny_model):
    c = loaded(tiny_model)
    with torch.no_grad():
        cond, uncond = pipeline.encode_prompts(c, ["cat " * 80], ["blurry"], Settings(width=64, height=64))
        empty = encode_text(c, [""], "a1111")
        assert cond.shape == uncond.shape == (1, 154, 32)
        assert torch.equal(uncond[:, 77:], empty) and torch.equal(uncond[:, :77], encode_text(c, ["blurry"], "a1111"))


def test_cli_long_emphasised_prompt_is_recorded_and_redone(ldm_here, tiny_model, tmp_path):
    prompt = "a (red:1.3) cat, " * 12 + "BREAK on a table"
    r = ldm_here("sample", prompt, "--model", tiny_model, "--steps", 3, "--seed", 2, "--clip-skip", 2, "--out",
            tmp_path / "a", "--json")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)[0]["path"]
    meta = json.loads(Image.open(made).text["ldm"])
    assert (meta["prompt_syntax"], meta["clip_skip"]) == ("a1111", 2)
    assert ", Clip skip: 2" in Image.open(made).text["parameters"]
    r = ldm_here("sample", "--from-png", made, "--out", tmp_path / "b", "--json")
    assert r.returncode == 0, r.stderr
    again = json.loads(r.stdout)[0]["path"]
    assert Image.open(made).tobytes() == Image.open(again).tobytes()


def test_sdxl_emphasis_and_long_prompts(tiny_sdxl):
    """SDXL: per text encoder, each chunk's penultimate states weighted with the mean restored, the two
    encoders concatenated on the feature axis; the pooled embedding from the first chunk, unweighted."""
    from ldm_cli.models.codecs import encode_text_sdxl

    c = loaded(tiny_sdxl)
    tok = c.tokenizer
    red, cat = ids(c, "red"), ids(c, "cat")[0]

    def written_out(token_rows, weight_rows):
        per_encoder, pooled = [], None
        for encoder in (c.text_encoder, c.text_encoder_2):
            zs = []
            for k, (tokens, weights) in enumerate(zip(token_rows, weight_rows)):
                pad = 75 - len(tokens)
                row = torch.tensor([[tok.bos_token_id, *tokens, tok.eos_token_id] + [tok.pad_token_id] * pad])
                out = encoder(row, output_hidden_states=True)
                pooled = out[0] if k == 0 and encoder is c.text_encoder_2 else pooled
                z = out.hidden_states[-2]
                mean = z.mean()
                z = z * torch.tensor([[1.0, *weights, 1.0] + [1.0] * pad]).unsqueeze(-1)
                zs.append(z * (mean / z.mean()))
            per_encoder.append(torch.cat(zs, dim=1))
        return torch.cat(per_encoder, dim=-1), pooled

    with torch.no_grad():
        hidden, pooled = encode_text_sdxl(c, ["(red:1.4) " + "cat " * 80], "a1111")
        want_h, want_p = written_out([red + [cat] * 74, [cat] * 6], [[1.4] * len(red) + [1.0] * 74, [1.0] * 6])
        assert hidden.shape == (1, 154, 64) and torch.allclose(hidden, want_h, atol=1e-5)
        assert torch.allclose(pooled, want_p, atol=1e-6)
        plain = encode_text_sdxl(c, ["a red cat"], "plain")
        same = encode_text_sdxl(c, ["a red cat"], "a1111")
        assert torch.equal(plain[0], same[0]) and torch.equal(plain[1], same[1])
        cond, uncond = pipeline.encode_prompts(c, ["cat " * 80], ["blurry"], Settings(width=64, height=64))
        assert cond.hidden.shape == uncond.hidden.shape == (1, 154, 64)


def test_two_loras_equal_diffusers_set_adapters(ldm_here, tiny_model, tmp_path):
    """--lora A:0.7 --lora B:0.4 equals diffusers' set_adapters([A, B], [0.7, 0.4]) (unfused), both recorded."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ldm_cli.models.options import LoadOptions
    from ldm_cli.sample.run import load

    files = [make_lora(tiny_model, tmp_path, f"lora{seed}", seed) for seed in (0, 1)]
    s = Settings(steps=4, width=64, height=64)
    o = LoadOptions(model=str(tiny_model), device="cpu", dtype="fp32", accel="none",
                    lora=(f"{files[0]}:0.7", f"{files[1]}:0.4"))
    c = load(o).components
    ours = pipeline.txt2img(c, ["a red cat"], [""], [3], s).permute(0, 2, 3, 1).numpy()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    for i, f in enumerate(files):
        pipe.load_lora_weights(str(f.parent), weight_name=f.name, adapter_name=f"l{i}")
    pipe.set_adapters(["l0", "l1"], adapter_weights=[0.7, 0.4])
    theirs = pipe("a red cat", num_inference_steps=4, guidance_scale=7.5, output_type="np",
                  generator=torch.Generator("cpu").manual_seed(3)).images
    one = pipeline.txt2img(load(LoadOptions(model=str(tiny_model), device="cpu", dtype="fp32", accel="none",
                                            lora=(f"{files[0]}:0.7",))).components, ["a red cat"], [""], [3], s)
    assert abs(ours - theirs).max() <= 1e-5
    assert abs(ours - one.permute(0, 2, 3, 1).numpy()).max() > 1e-3  # the second LoRA counts
    assert re.fullmatch(f"{files[0]}@0.7#[0-9a-f]{{10}}, {files[1]}@0.4#[0-9a-f]{{10}}", c.lora)
    r = ldm_here("sample", "x", "--model", tiny_model, "--lora", f"{files[0]}:11", "--steps", 1, "--out", tmp_path / "o")
    assert r.returncode == 2 and "the scale must be in [-10, 10]" in r.stderr and r.stderr.count("\n") == 1


def kohya_from_diffusers(path, alpha: float, text_encoder: dict | None = None) -> dict:
    """The LoRA file at `path` (diffusers' format, alpha = rank) in kohya's format, written out here from
    sd-scripts' naming: `lora_unet_<module path with _>.lora_down/lora_up.weight` and `.alpha`, the up
    weights multiplied by rank / alpha so that the delta (alpha / rank) B A is the same; `text_encoder`:
    {module: (down, up)} added as `lora_te_...` with alpha = rank."""
    from safetensors.torch import load_file

    out = {}
    for key, value in load_file(path).items():
        module, kind = key.removeprefix("unet.").rsplit(".lora.", 1)
        name = "lora_unet_" + module.replace(".", "_")
        rank = value.shape[0] if kind == "down.weight" else value.shape[1]
        out[f"{name}.lora_{kind}"] = value * (rank / alpha) if kind == "up.weight" else value
        out[f"{name}.alpha"] = torch.tensor(alpha)
    for module, (down, up) in (text_encoder or {}).items():
        name = "lora_te_text_model_" + module.replace(".", "_")
        out.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                    f"{name}.alpha": torch.tensor(float(down.shape[0]))})
    return out


def test_kohya_lora_equals_diffusers_and_its_own_diffusers_form(tiny_model, tmp_path):
    """A kohya-format file (lora_unet_/lora_te_ names, alpha != rank): --lora FILE:0.8 equals diffusers'
    load_lora_weights + set_adapters(0.8); its U-Net part equals the same LoRA in diffusers' format, and its
    text-encoder part changes the image."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file

    from ldm_cli.models.options import LoadOptions
    from ldm_cli.sample.run import load

    diffusers_file = make_lora(tiny_model, tmp_path, "d", 2)
    g = torch.Generator().manual_seed(7)
    te = {f"encoder.layers.0.self_attn.{m}": (torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g) * 0.5)
          for m in ("q_proj", "k_proj", "v_proj", "out_proj")}  # as sd-scripts writes them
    save_file(kohya_from_diffusers(diffusers_file, 2.0), tmp_path / "k_unet.safetensors")
    save_file(kohya_from_diffusers(diffusers_file, 2.0, te), tmp_path / "k_both.safetensors")
    s = Settings(steps=4, width=64, height=64)

    def ours(spec):
        c = load(LoadOptions(model=str(tiny_model), device="cpu", dtype="fp32", accel="none", lora=(spec,))).components
        return pipeline.txt2img(c, ["a red cat"], ["blurry"], [3], s).permute(0, 2, 3, 1).numpy()

    both, unet_only = ours(f"{tmp_path / 'k_both.safetensors'}:0.8"), ours(f"{tmp_path / 'k_unet.safetensors'}:0.8")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(tmp_path), weight_name="k_both.safetensors", adapter_name="k")
    pipe.set_adapters(["k"], adapter_weights=[0.8])
    theirs = pipe("a red cat", negative_prompt="blurry", num_inference_steps=4, guidance_scale=7.5, output_type="np",
                  generator=torch.Generator("cpu").manual_seed(3)).images
    assert abs(both - theirs).max() <= 1e-5
    assert abs(unet_only - ours(f"{diffusers_file}:0.8")).max() <= 1e-5
    assert abs(both - unet_only).max() > 1e-3 and abs(unet_only - ours(f"{diffusers_file}:0.0")).max() > 1e-3


def test_textual_inversion_equals_diffusers(ldm_here, tiny_model, tmp_path):
    """--embedding in the diffusers format (one vector) and A1111's safetensors (emb_params, two vectors):
    the image equals diffusers' load_textual_inversion + its pipeline; recorded, and asked for on redo."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file

    from ldm_cli.models.options import LoadOptions
    from ldm_cli.sample.run import load

    g = torch.Generator().manual_seed(0)
    save_file({"<toy>": torch.randn(1, 32, generator=g)}, tmp_path / "toy.safetensors")
    save_file({"emb_params": torch.randn(2, 32, generator=g) * 2}, tmp_path / "style.safetensors")
    prompt = "a <toy> cat, (style:1.0)"
    s = Settings(steps=4, width=64, height=64)
    c = load(LoadOptions(model=str(tiny_model), device="cpu", dtype="fp32", accel="none",
                         embedding=(str(tmp_path / "toy.safetensors"), f"{tmp_path / 'style.safetensors'}:sty"))).components
    ours = pipeline.txt2img(c, [prompt.replace("style", "sty")], [""], [5], s).permute(0, 2, 3, 1).numpy()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_textual_inversion(str(tmp_path / "toy.safetensors"), token="<toy>")
    pipe.load_textual_inversion(str(tmp_path / "style.safetensors"), token="sty")
    theirs = pipe("a <toy> cat, sty", num_inference_steps=4, guidance_scale=7.5, output_type="np",
                  generator=torch.Generator("cpu").manual_seed(5)).images
    plain = pipeline.txt2img(loaded(tiny_model), ["a toy cat, sty"], [""], [5], s).permute(0, 2, 3, 1).numpy()
    assert abs(ours - theirs).max() <= 1e-5 and abs(ours - plain).max() > 1e-3
    assert c.embeddings.startswith("<toy>@") and ", sty@" in c.embeddings
    out = tmp_path / "o"
    r = ldm_here("sample", "a <toy> cat", "--model", tiny_model, "--embedding", tmp_path / "toy.safetensors", "--steps", 2,
            "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)[0]["path"]
    assert "TI: <toy>@" in Image.open(made).text["parameters"]
    r = ldm_here("sample", "--from-png", made, "--out", tmp_path / "redo")
    assert r.returncode == 2 and "--embedding FILE:TOKEN" in r.stderr and r.stderr.count("\n") == 1
    r = ldm_here("sample", "x", "--model", tiny_model, "--embedding", tmp_path / "toy.pt", "--out", out)
    assert r.returncode == 2 and "file not found" in r.stderr


def make_lora(tiny_model, folder, name, seed):
    """A LoRA file for the tiny model with random (non-zero) B: FOLDER/NAME.safetensors."""
    from diffusers import UNet2DConditionModel

    from ldm_cli.models.lora import add_lora, save_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    add_lora(unet, 4)
    torch.manual_seed(seed)
    for n, p in unet.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.3)
    folder.mkdir(parents=True, exist_ok=True)
    return save_lora(unet, folder / f".{name}").rename(folder / f"{name}.safetensors")


def test_prompt_lora_tags_equal_lora_flags_and_redo_bitwise(ldm_here, tiny_model, tmp_path):
    """<lora:a:0.7> in the prompt (found in --lora-dir, in a sub-folder) with --lora b:0.4 gives the image
    --lora a:0.7 --lora b:0.4 gives; the tag is not text; both hashes recorded; --from-png with --lora-dir
    and --lora redoes it bitwise, warns for a changed file, and asks for --lora-dir when it is missing."""
    from ldm_cli.models.lora import file_hash
    from ldm_cli.models.options import LoadOptions
    from ldm_cli.sample.run import load

    a = make_lora(tiny_model, tmp_path / "loras" / "styles", "a", 0)
    b = make_lora(tiny_model, tmp_path / "other", "b", 1)
    common = ("--model", tiny_model, "--steps", 3, "--seed", 4, "--device", "cpu", "--accel", "none")
    r = ldm_here("sample", "a red cat, <lora:a:0.7>", *common, "--lora-dir", tmp_path / "loras", "--lora", f"{b}:0.4",
            "--out", tmp_path / "tag")
    assert r.returncode == 0, r.stderr
    tagged = next((tmp_path / "tag").glob("*.png"))
    px = lambda p: np.asarray(Image.open(p).convert("RGB")).astype(int)  # noqa: E731
    s = Settings(steps=3, width=64, height=64)
    with_loras = lambda *loras: images_u8(pipeline.txt2img(load(LoadOptions(  # noqa: E731
        model=str(tiny_model), device="cpu", dtype="fp32", accel="none", lora=loras)).components, ["a red cat, "],
        [""], [4], s))
    assert np.abs(with_loras(f"{b}:0.4", f"{a}:0.7") - px(tagged)).max() <= 1  # the same LoRAs, in the same order
    assert np.abs(with_loras(f"{b}:0.4") - px(tagged)).max() > 3  # the tag applied a LoRA
    text = Image.open(tagged).text["parameters"]
    assert f'Lora hashes: "b: {file_hash(b)}, a: {file_hash(a)}"' in text and "<lora:a:0.7>" in text

    r = ldm_here("sample", "--from-png", tagged, "--lora", f"{b}:0.4", "--lora-dir", tmp_path / "loras", "--out",
            tmp_path / "redo")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(px(next((tmp_path / "redo").glob("*.png"))), px(tagged))
    r = ldm_here("sample", "--from-png", tagged, "--lora", f"{b}:0.4", "--out", tmp_path / "x")
    assert r.returncode == 2 and "<lora:a:0.7>: give --lora-dir" in r.stderr and r.stderr.count("\n") == 1
    make_lora(tiny_model, tmp_path / "changed", "a", 5)
    r = ldm_here("sample", "--from-png", tagged, "--lora", f"{b}:0.4", "--lora-dir", tmp_path / "changed", "--out",
            tmp_path / "y")
    assert r.returncode == 0 and "is not the LoRA a" in r.stderr and "the image will differ" in r.stderr
    from ldm_cli.models.lora import prompt_loras

    with pytest.raises(LdmError, match="different <lora:...> sets"):
        prompt_loras(["x <lora:a:0.7>", "y <lora:b>"], str(tmp_path))
    with pytest.raises(LdmError, match="<lora:NAME:WEIGHT> tags only"):
        prompt_loras(["x <hypernet:a:1>"], None)
    assert prompt_loras(["x <lora:a:0.7> y", "<lora:a:0.7>z"], str(tmp_path / "loras")) == ((str(a), "a", 0.7),)


def images_u8(pixels):
    return (pixels.permute(0, 2, 3, 1).numpy()[0] * 255).round().astype(int)
