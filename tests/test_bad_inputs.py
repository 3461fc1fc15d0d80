"""The bad-input table: each row is a command with one bad option value, file or folder.

Each must exit with the stated code, print exactly one line on stderr that names the culprit, show no
traceback, and write nothing. Rows marked ok=True are unusual but valid input that must work.
Run in-process through `cli.main` (the same code path as the console script, minus the start-up).
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_cli import cli
from ldm_cli.sample import pipeline


def build_inputs(tmp, tiny_model):
    x = tmp / "misc"
    x.mkdir()
    (x / "empty.txt").write_text("# only a comment\n\n")
    (x / "latin1.txt").write_bytes("a caf\xe9 au lait\n".encode("latin-1"))
    (x / "notimage.png").write_text("this is not a PNG")
    (x / "blocker").write_text("a file where a folder should be")
    (x / "model.ckpt").write_bytes(b"\x80\x04not really a pickle")
    (x / "corrupt.safetensors").write_bytes(b"\xff" * 100)
    broken = x / "broken-model"
    broken.mkdir()
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        src = tiny_model / sub
        (broken / sub).mkdir()
        for f in src.iterdir():
            (broken / sub / f.name).write_bytes(f.read_bytes()[:200] if f.suffix == ".safetensors" else f.read_bytes())
    (broken / "model_index.json").write_text((tiny_model / "model_index.json").read_text())
    img = tmp / "img"
    img.mkdir()
    Image.new("RGB", (64, 64), "red").save(img / "good.png")
    (img / "truncated.png").write_bytes((img / "good.png").read_bytes()[:60])
    (img / "zero.png").write_bytes(b"")
    Image.new("RGB", (1, 1)).save(img / "one.png")
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(img / "cmyk.jpg")
    Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)).save(img / "sixteen.png")
    Image.new("P", (64, 64), 3).save(img / "palette.png")
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    frames[0].save(img / "animated.gif", save_all=True, append_images=frames[1:])
    bomb = Image.new("1", (20000, 20000))  # 1-bit, compresses to almost nothing: a decompression bomb
    bomb.save(img / "bomb.png")
    p = tmp / "prompts"
    p.mkdir()
    (p / "nul.txt").write_bytes(b"a cat\x00 in a hat\n")
    (p / "long.txt").write_text("a " * 500_000 + "\n")
    (p / "many.txt").write_text("a cat\n" * 99_999 + "a dog | steps=0\n")
    (p / "bad-override.txt").write_text("a cat | steps=abc\n")
    (p / "bad.jsonl").write_text('{"prompt": "a cat", "seed": -5}\n')
    m = tmp / "models"
    m.mkdir()
    import shutil

    shutil.copytree(tiny_model, m / "no-unet")
    shutil.rmtree(m / "no-unet" / "unet")
    shutil.copytree(tiny_model, m / "shapes")
    cfg = json.loads((m / "shapes" / "unet" / "config.json").read_text())
    cfg["cross_attention_dim"] = 48  # the weights say 32
    (m / "shapes" / "unet" / "config.json").write_text(json.dumps(cfg))
    shutil.copytree(tiny_model, m / "header")
    w = m / "header" / "vae" / "diffusion_pytorch_model.safetensors"
    w.write_bytes((10**9).to_bytes(8, "little") + b"{}" + w.read_bytes()[10:])  # header length past the end
    (m / "lora.bin").write_bytes(b"\x80\x04 pickle")
    (m / "unet.json").write_text("{not json")
    d = tmp / "data"
    d.mkdir()
    os.symlink(d, d / "loop")  # a folder that contains itself
    Image.new("RGB", (64, 64)).save(d / "a.png")
    (d / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    Image.new("RGB", (64, 64)).save(d / "b.png")
    (d / "b.txt").write_text("a black square")
    # ---- crafted files and hostile values
    (p / "dup.txt").write_text("a cat | steps=2 steps=3\n")
    (p / "dup.jsonl").write_text('{"prompt": "a cat", "seed": 1, "seed": 2}\n')
    (p / "strength.txt").write_text("a cat | strength=0.5\n")
    (p / "ff.txt").write_text("a cat\x0cin a hat\nanother | steps=0\n")
    (p / "sampler.txt").write_text("a cat | sampler=dpm++2m schedule=karras\na dog | sampler=euler-x\n")
    (p / "sampler.jsonl").write_text('{"prompt": "a cat", "sampler": "lcm", "steps": 4}\n'
                                     '{"prompt": "a dog", "sampler": "ddim", "schedule": "karras"}\n')
    (p / "newline.jsonl").write_text('{"prompt": "a cat\\nSteps: 99, Sampler: Evil"}\n')
    os.mkfifo(img / "fifo.png")
    Image.new("1", (8192 + 8, 16)).save(img / "wide.png")
    (m / "empty.safetensors").write_bytes(b"")
    (m / "embedding.pt").write_bytes(b"\x80\x04 pickle")
    (m / "notes.txt").write_text("not weights\n")
    from safetensors.torch import save_file  # names of an SGM-layout SDXL checkpoint, tiny tensors
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(4),
               "conditioner.embedders.1.model.ln_final.weight": torch.ones(4),
               "model.diffusion_model.input_blocks.0.0.weight": torch.ones(4, 4, 3, 3)}, m / "sdxl-like.safetensors")
    (m / "huge-unet.json").write_text(json.dumps({"block_out_channels": [100000, 100000]}))
    for name, sub, file, change in (("huge-sample", "unet", "config.json", {"sample_size": 100000}),
                                    ("huge-tokens", "tokenizer", "tokenizer_config.json", {"model_max_length": 10**9}),
                                    ("bad-scheduler", "scheduler", "scheduler_config.json",
                                     {"num_train_timesteps": -5}),
                                    ("missing-weights", "unet", "config.json", {"time_cond_proj_dim": 8})):
        shutil.copytree(tiny_model, m / name)
        cfg_path = m / name / sub / file
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **change}))
    shutil.copytree(tiny_model, m / "lcm-distilled")  # a U-Net with a guidance embedding, all its weights saved
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    lcm = UNet2DConditionModel.from_config({**unet.config, "time_cond_proj_dim": 8})
    lcm.load_state_dict(unet.state_dict(), strict=False)
    lcm.save_pretrained(m / "lcm-distilled" / "unet")
    shutil.copytree(tiny_model, m / "list-vocab")
    for f in ("vocab.json", "tokenizer.json"):
        (m / "list-vocab" / "tokenizer" / f).write_text("[1, 2, 3]")
    from ldm_cli.io.metadata import png_info
    from ldm_cli.jobs import Job, Settings

    made = Job("a cat", 1, Settings(steps=2, strength=0.5), "/etc/hostname")
    Image.new("RGB", (64, 64)).save(x / "i2i.png", pnginfo=png_info(made, str(tiny_model), 64, 64))
    Image.new("RGB", (64, 64)).save(x / "lora.png", pnginfo=png_info(Job("a cat", 1, Settings(steps=2)),
                                                                       str(tiny_model), 64, 64, lora="x.safetensors@1"))
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_itxt("ldm", json.dumps({"prompt": "a", "seed": 1, "steps": 2.9, "model": str(tiny_model)}))
    Image.new("RGB", (64, 64)).save(x / "steps-float.png", pnginfo=info)
    meta = tmp / "meta"
    meta.mkdir()
    Image.new("RGB", (64, 64)).save(meta / "a.png")
    (meta / "metadata.jsonl").write_text('{"file_name": 5, "text": "x"}\n' + "[" * 100_000 + "\n")
    return x, img, p, m, d


def cases(tmp, tiny_model, shapes):
    x, img, p, m, d = build_inputs(tmp, tiny_model)
    tm = ("--model", str(tiny_model))
    s = ("sample", "x", *tm, "--steps", "1")
    i2i = ("img2img",)
    tr = ("train", str(shapes), *tm, "--resolution", "64", "--max-steps", "1", "--device", "cpu", "-q")
    return [
        # (name, args, exit code, text in the message, or None when it must succeed)
        ("missing model", ("sample", "x", "--model", x / "nope"), 2, "no such folder or file"),
        ("corrupt model folder", ("sample", "x", "--model", x / "broken-model"), 2, "could not load the model"),
        ("corrupt single file", ("sample", "x", "--model", x / "corrupt.safetensors"), 2, "not a valid .safetensors"),
        ("pickle refused", ("sample", "x", "--model", x / "model.ckpt"), 2, "--allow-unsafe-pickle"),
        ("width not multiple of 8", ("sample", "x", *tm, "--width", 63), 2, "width must be a multiple of 8"),
        ("height not multiple of 8", ("sample", "x", *tm, "--height", 100), 2, "height must be a multiple of 8"),
        ("steps < 1", ("sample", "x", *tm, "--steps", 0), 2, "steps must be >= 1"),
        ("steps not a number", ("sample", "x", *tm, "--steps", "many"), 2, "--steps"),
        ("value missing, an option next", ("sample", "x", *tm, "--negative", "--steps", 1), 2,
         "--negative needs a value, but the next argument is the option --steps"),  # else '1' became a prompt
        ("value missing before a train option", (*tr, "--buckets", "--lora-rank", 4), 2,
         "--buckets needs a value, but the next argument is the option --lora-rank"),
        ("strength 0", ("img2img", x / "notimage.png", "x", *tm, "--strength", 0), 2, "strength must be in (0, 1]"),
        ("strength > 1", ("img2img", x / "notimage.png", "x", *tm, "--strength", 1.5), 2, "strength must be in (0, 1]"),
        ("cfg nan", ("sample", "x", *tm, "--cfg", "nan"), 2, "--cfg must be in [0, 100], got nan"),
        ("cfg inf", ("sample", "x", *tm, "--cfg", "inf"), 2, "--cfg must be in [0, 100], got inf"),
        ("unreadable image", ("img2img", x / "notimage.png", "x", *tm, "--steps", 2), 2, "cannot read image"),
        ("missing image", ("img2img", x / "nope.png", "x", *tm), 2, "no such image"),
        ("empty prompt file", ("sample", "--prompt-file", x / "empty.txt", *tm), 2, "no prompts"),
        ("invalid UTF-8", ("sample", "--prompt-file", x / "latin1.txt", *tm), 2, "latin1.txt:1: not valid UTF-8"),
        ("no prompt", ("sample", *tm), 2, "no prompt"),
        ("output not writable", ("sample", "x", *tm, "--steps", 1, "--out", x / "blocker" / "sub"), 2,
         "output folder is not writable"),
        ("output is a file", ("sample", "x", *tm, "--steps", 1, "--out", x / "notimage.png"), 2,
         "notimage.png: is a file; --out takes a folder"),
        ("skip-existing without a seed", ("sample", "x", *tm, "--steps", 1, "--skip-existing"), 2,
         "--skip-existing needs --seed N"),  # else every run drew new seeds and remade every image
        ("output named as an image", ("sample", "x", *tm, "--steps", 1, "--out", x / "cat.png"), 2,
         "--out is a folder (images are named NNNNN-SEED-PROMPT.png in it), not an image file"),  # made cat.png/
        ("cuda absent", ("sample", "x", *tm, "--device", "cuda"), 2, "CUDA is not available"),
        ("from-png not ldm", ("sample", "--from-png", x / "notimage.png"), 2, "cannot read PNG"),
        ("unknown sampler", (*s, "--sampler", "plms"), 2, "--sampler must be ddim, ddpm, euler"),
        ("unknown schedule", (*s, "--schedule", "polyexponential"), 2, "--schedule must be default, karras or"),
        ("schedule for ddim", (*s, "--schedule", "karras"), 2, "--schedule karras applies to euler"),
        ("eta for euler", (*s, "--sampler", "euler", "--eta", "0.5"), 2, "--eta applies to --sampler ddim only"),
        ("lcm above 50 steps", (*s, "--sampler", "lcm", "--steps", "60"), 2, "the lcm sampler takes at most 50"),
        ("prompt-file unknown sampler", ("sample", "--prompt-file", p / "sampler.txt", *tm), 2,
         "sampler.txt:2: sampler must be ddim"),
        ("jsonl schedule for ddim", ("sample", "--prompt-file", p / "sampler.jsonl", *tm), 2,
         "sampler.jsonl:2: schedule karras applies to euler"),
        ("SDXL single file, no configs offline", ("sample", "x", "--model", m / "sdxl-like.safetensors"), 2,
         "could not load as an SDXL checkpoint (--config DIR_OR_HUB_ID"),
        ("SDXL micro-conditioning on SD", (*s, "--target-size", "64x64"), 2, "this model is not SDXL"),
        ("bad --original-size", (*s, "--original-size", "64by64"), 2, "--original-size must be WIDTHxHEIGHT"),
        ("bad --crops-coords-top-left", (*s, "--crops-coords-top-left", "3x4"), 2,
         "--crops-coords-top-left must be TOP,LEFT"),
        ("embedding missing", (*s, "--embedding", m / "nope.safetensors"), 2, "file not found"),
        ("embedding pickle refused", (*s, "--embedding", m / "embedding.pt"), 2, "--allow-unsafe-pickle"),
        ("embedding not an embedding", (*s, "--embedding", m / "sdxl-like.safetensors"), 2, "holds 3 tensors"),
        ("negative prompt weight", ("sample", "a (cat:-1)", *tm, "--steps", "1"), 2, "prompt weight :-1 is not"),
        ("--clip-skip 0", (*s, "--clip-skip", "0"), 2, "--clip-skip must be between 1 and 12"),
        ("--clip-skip past the encoder", (*s, "--clip-skip", "5"), 2, "this text encoder has 2 layers"),
        ("unknown --prompt-syntax", (*s, "--prompt-syntax", "comfy"), 2, "--prompt-syntax must be a1111 or plain"),
        ("LCM-distilled U-Net", ("sample", "x", "--model", m / "lcm-distilled", "--steps", "2"), 2,
         "takes a guidance-scale embedding"),
        ("weights missing for the config", ("sample", "x", "--model", m / "missing-weights", "--steps", "2"), 2,
         "the U-Net's weights lack 1 tensor(s)"),
        ("sampler and schedule ok", (*s, "--sampler", "dpm++2m-sde", "--schedule", "exponential", "--steps", "3"),
         0, None),
        ("sample -n 0", (*s, "-n", "0"), 2, "num-images"),
        ("sample -n not a number", (*s, "-n", "two"), 2, "--num-images"),
        ("sample --batch-size 0", (*s, "--batch-size", "0"), 2, "--batch-size must be >= 1"),
        ("sample --seed negative", (*s, "--seed", "-1"), 2, "seed"),
        ("sample --seed huge", (*s, "--seed", str(2**70)), 2, "seed"),
        ("sample --eta nan", (*s, "--eta", "nan"), 2, "eta"),
        ("sample --eta 2", (*s, "--eta", "2"), 2, "eta"),
        ("sample --width huge", (*s, "--width", "65536"), 2, "width"),
        ("sample --width empty", (*s, "--width", ""), 2, "--width"),
        ("sample --dtype bad", (*s, "--dtype", "fp8"), 2, "dtype"),
        ("sample --device bad", (*s, "--device", "tpu"), 2, "device"),
        ("sample --accel bad", (*s, "--accel", "turbo"), 2, "accel"),
        ("sample --vae-tiling bad", (*s, "--vae-tiling", "sometimes"), 2, "vae-tiling"),
        ("sample --lora missing", (*s, "--lora", str(m / "nope.safetensors")), 2, "--lora"),
        ("sample --lora pickle", (*s, "--lora", str(m / "lora.bin")), 2, "--allow-unsafe-pickle"),
        ("sample --lora-scale nan", (*s, "--lora", str(m / "lora.bin"), "--lora-scale", "nan"), 2, "lora-scale"),
        ("sample empty prompt", ("sample", "", *tm), 2, "prompt"),
        ("prompt file NUL byte", ("sample", "--prompt-file", str(p / "nul.txt"), *tm), 2, "nul.txt:1"),
        ("prompt file 1 MB line", ("sample", "--prompt-file", str(p / "long.txt"), *tm), 2, "long.txt:1"),
        ("prompt file 100k lines, bad last", ("sample", "--prompt-file", str(p / "many.txt"), *tm), 2,
         "many.txt:100000"),
        ("prompt file bad override", ("sample", "--prompt-file", str(p / "bad-override.txt"), *tm), 2, "bad-override.txt:1"),
        ("prompt jsonl bad seed", ("sample", "--prompt-file", str(p / "bad.jsonl"), *tm), 2, "bad.jsonl:1"),
        ("prompt file is a folder", ("sample", "--prompt-file", str(p), *tm), 2, str(p)),
        ("image truncated", (*i2i, str(img / "truncated.png"), "x", *tm), 2, "truncated.png"),
        ("image zero bytes", (*i2i, str(img / "zero.png"), "x", *tm), 2, "zero.png"),
        ("image 1x1", (*i2i, str(img / "one.png"), "x", *tm), 2, "one.png"),
        ("image decompression bomb", (*i2i, str(img / "bomb.png"), "x", *tm), 2, "bomb.png"),
        ("image CMYK", (*i2i, str(img / "cmyk.jpg"), "x", *tm, "--steps", "2"), 0, None),
        ("image 16-bit", (*i2i, str(img / "sixteen.png"), "x", *tm, "--steps", "2"), 0, None),
        ("image palette", (*i2i, str(img / "palette.png"), "x", *tm, "--steps", "2"), 0, None),
        ("image animated", (*i2i, str(img / "animated.gif"), "x", *tm, "--steps", "2"), 0, None),
        ("img2img strength nan", (*i2i, str(img / "good.png"), "x", *tm, "--strength", "nan"), 2, "strength"),
        ("model missing unet", ("sample", "x", "--model", str(m / "no-unet")), 2, "no-unet"),
        ("model mismatched shapes", ("sample", "x", "--model", str(m / "shapes")), 2, "shapes"),
        ("model corrupt header", ("sample", "x", "--model", str(m / "header")), 2, "header"),
        ("model is an empty string", ("sample", "x", "--model", ""), 2, "model"),
        ("info missing model", ("info", str(m / "nothing")), 2, "nothing"),
        ("train --lr negative", (*tr, "--lr", "-1"), 2, "--lr"),
        ("train --lr nan", (*tr, "--lr", "nan"), 2, "--lr"),
        ("train --resolution 63", (*tr, "--resolution", "63"), 2, "--resolution"),
        ("train --batch-size 0", (*tr, "--batch-size", "0"), 2, "--batch-size"),
        ("train --max-steps -5", (*tr, "--max-steps", "-5"), 2, "--max-steps"),
        ("train --max-steps and --epochs", (*tr, "--epochs", "1"), 2, "--epochs"),
        ("train --mixed-precision bad", (*tr, "--mixed-precision", "fp4"), 2, "--mixed-precision"),
        ("train --optimizer bad", (*tr, "--optimizer", "sgd"), 2, "--optimizer"),
        ("train --caption-dropout 2", (*tr, "--caption-dropout", "2"), 2, "--caption-dropout"),
        ("train --ema-decay 1", (*tr, "--ema-decay", "1"), 2, "--ema-decay"),
        ("train --lora-rank with --from-scratch", (*tr, "--lora-rank", "4", "--from-scratch"), 2, "--lora-rank"),
        ("train --unet-config bad JSON", (*tr, "--from-scratch", "--unet-config", str(m / "unet.json")), 2, "unet.json"),
        ("train --resume missing", (*tr, "--resume", str(m / "nope")), 2, "--resume"),
        ("train --resume latest, none", (*tr, "--resume", "latest"), 2, "no complete checkpoint"),
        ("train data is a file", ("train", str(m / "unet.json"), *tm), 2, "unet.json"),
        ("train data symlink loop + latin-1 caption, --strict", ("train", str(d), *tm, "--strict", "--max-steps", "1"),
         2, "a.txt: caption is not UTF-8"),
        ("train data symlink loop + latin-1 caption", ("train", str(d), *tm, "--resolution", "64", "--max-steps", "1",
                                                       "--device", "cpu", "-q"), 0, None),
        # crafted files, hostile values, paths in metadata
        ("prompt file duplicate key", ("sample", "--prompt-file", str(p / "dup.txt"), *tm), 2,
         "dup.txt:1: steps is given twice"),
        ("prompt jsonl duplicate key", ("sample", "--prompt-file", str(p / "dup.jsonl"), *tm), 2,
         "dup.jsonl:1: seed is given twice"),
        ("prompt file strength in txt2img", ("sample", "--prompt-file", str(p / "strength.txt"), *tm), 2,
         "strength.txt:1: strength applies to img2img only"),
        ("prompt file form feed in a line", ("sample", "--prompt-file", str(p / "ff.txt"), *tm), 2,
         "ff.txt:1: prompt contains a line break"),
        ("prompt with a newline forging metadata", ("sample", "--prompt-file", str(p / "newline.jsonl"), *tm), 2,
         "newline.jsonl:1: prompt contains a line break"),
        ("prompt file /dev/zero", ("sample", "--prompt-file", "/dev/zero", *tm), 2, "/dev/zero"),
        ("sample --cfg 1e38", (*s, "--cfg", "1e38"), 2, "--cfg must be"),
        ("sample --lora-scale 1e30", (*s, "--lora-scale", "1e30"), 2, "--lora-scale must be in [-10, 10]"),
        ("sample -n huge names -n", (*s, "-n", "100000"), 2, "--num-images must be between 1 and 10000"),
        ("sample --seed largest allowed", (*s, "--seed", str(2**63 - 1)), 0, None),
        ("sample --lora empty file", (*s, "--lora", str(m / "empty.safetensors")), 2, "the file is empty"),
        ("sample --lora not a weights file", (*s, "--lora", str(m / "notes.txt")), 2,
         "not a weights file (expected .safetensors"),
        ("model mistyped local folder", ("sample", "x", "--model", "./no-such-dir/model"), 2, "no such folder"),
        ("model hub miss offline", ("sample", "x", "--model", "no-org/no-model"), 2, "not in the local Hugging Face cache"),
        ("model huge sample_size", ("sample", "x", "--model", str(m / "huge-sample")), 2, "sample_size"),
        ("model huge tokenizer length", ("sample", "x", "--model", str(m / "huge-tokens")), 2, "model_max_length"),
        ("model bad scheduler values", ("sample", "x", "--model", str(m / "bad-scheduler")), 2, "num_train_timesteps"),
        ("model tokenizer vocab a JSON list", ("sample", "x", "--model", str(m / "list-vocab")), 2, "list-vocab"),
        ("image FIFO", (*i2i, str(img / "fifo.png"), "x", *tm), 2, "not a regular file"),
        ("image too wide", (*i2i, str(img / "wide.png"), "x", *tm), 2, "sides up to 8192"),
        ("from-png img2img path", ("sample", "--from-png", str(x / "i2i.png")), 2, "paths in a PNG are not followed"),
        ("from-png LoRA not given", ("sample", "--from-png", str(x / "lora.png")), 2, "pass --lora"),
        ("from-png steps 2.9", ("sample", "--from-png", str(x / "steps-float.png")), 2, "steps must be an integer"),
        ("train metadata.jsonl number name, deep nesting", ("train", str(tmp / "meta"), *tm), 2, "nested too deeply"),
        ("train --out is a file", (*tr, "--out", str(x / "blocker")), 2, "exists and is not a folder"),
        ("train --out inside the data", ("train", str(d), *tm, "--out", str(d / "run")), 2, "inside the data folder"),
        ("train --cache-dir is a file", (*tr, "--cache-dir", str(x / "blocker")), 2, "--cache-dir"),
        ("train absurd --unet-config", (*tr, "--from-scratch", "--unet-config", str(m / "huge-unet.json")), 2,
         "far beyond"),
        ("train --gpus 2 without GPUs", (*tr[:-3], "-q", "--gpus", "2"), 2,  # (with --device cpu: 2 CPU processes)
         "--gpus 2: this machine has 0 CUDA GPU"),
        ("sample 8192x8192 on a CPU without --yes", (*s, "--width", "8192", "--height", "8192"), 2, "pass --yes"),
        ("train --validation-steps past the schedule", (*tr, "--validation-steps", "5000"), 2, "--validation-steps"),
        ("train --textual-inversion without --init-word", (*tr, "--textual-inversion", "zqx"), 2, "--init-word"),
        ("train --init-word alone", (*tr, "--init-word", "dog"), 2, "go with --textual-inversion"),
        ("train --ema-decay without --ema", (*tr, "--ema-decay", "0.99"), 2, "--ema-decay goes with --ema"),
        ("train --lora-alpha without --lora-rank", (*tr, "--lora-alpha", "8"), 2, "goes with --lora-rank"),
        ("train --warmup-steps with piecewise_constant", (*tr, "--warmup-steps", "5", "--lr-scheduler",
                                                          "piecewise_constant"), 2, "does not apply"),
        ("train --prior-loss-weight without DreamBooth", (*tr, "--prior-loss-weight", "0.5"), 2, "--class-data"),
        ("train --textual-inversion with --lora-rank", (*tr, "--textual-inversion", "zqx", "--init-word", "red",
                                                        "--lora-rank", "4"), 2, "drop --lora-rank"),
        ("train --textual-inversion, a word of the vocabulary", (*tr, "--textual-inversion", "red", "--init-word",
                                                                 "blue"), 2, "already a word"),
        ("train --textual-inversion, no caption names it", (*tr, "--textual-inversion", "zqx", "--init-word", "red",
                                                            "--instance-prompt", "a thing"), 2, "no caption names zqx"),
        ("train --textual-inversion, token with a space", (*tr, "--textual-inversion", "a b", "--init-word", "red"),
         2, "one word"),
    ]


@pytest.fixture(scope="module")
def table(tmp_path_factory, tiny_model, shapes):
    return {c[0]: c[1:] for c in cases(tmp_path_factory.mktemp("bad-inputs"), tiny_model, shapes)}


def _names():
    import inspect

    src = inspect.getsource(cases)
    return [line.split('("', 1)[1].split('"', 1)[0] for line in src.splitlines() if line.strip().startswith('("')
            and '", (' in line]


def assert_made(command, out):
    """A row that must work made what it should: PNGs that open, sized as their metadata says, or a
    trained model folder."""
    if command == "train":
        assert (out / "model" / "model_index.json").is_file() and (out / "checkpoints").is_dir()
        return
    pngs = sorted(out.glob("*.png"))
    assert pngs, "no image written"
    for path in pngs:
        with Image.open(path) as im:
            meta = json.loads(im.text["ldm"])
            assert im.size == (64, 64) and np.asarray(im).std() > 0, (path, im.size)
            assert meta["prompt"] == "x" and isinstance(meta["seed"], int)


@pytest.mark.parametrize("name", _names())
def test_bad_input(name, table, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    args, code, text = table[name]
    out = tmp_path / "out"
    given_out = Path(args[args.index("--out") + 1]) if "--out" in args else None  # a case about --out itself
    existed = given_out is not None and given_out.exists()
    if args[0] != "info" and "--out" not in args:
        args = (*args, "--out", str(out))
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    if text is None:
        assert e.value.code == 0, err
        assert_made(args[0], out)
        return
    lines = err.strip().splitlines()
    assert (e.value.code, len(lines)) == (code, 1), err
    assert lines[0].startswith("ldm: error: ") and text in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.exists() or not any(out.rglob("*.png")) and not any(out.rglob("model_index.json"))
    assert given_out is None or existed or not given_out.exists(), f"{given_out} was made"  # a folder cat.png


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
    assert not any(tmp_path.rglob("*.png"))


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory: you "
                                                                "tried to allocate 1073741824 bytes"), None])
def test_out_of_cpu_memory_is_one_line(error, monkeypatch, capsys, tiny_model, tmp_path):
    """Running out of RAM is said in one line (exit 1); any other RuntimeError is a bug, shown as one."""
    def fail(*a, **k):
        raise error if error is not None else RuntimeError("something else")

    monkeypatch.setattr(pipeline, "txt2img", fail)
    argv = ["sample", "x", "--model", str(tiny_model), "--out", str(tmp_path), "-q"]
    if error is None:
        with pytest.raises(RuntimeError, match="something else"):
            cli.main(argv)
        return
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and err[0].startswith("ldm: error: out of memory (CPU RAM)"), err


def test_help_and_refused_settings_import_neither_torch_nor_diffusers():
    """`ldm --help` and a setting refused before any model work answer without the 2-4 s of torch's and
    diffusers' imports (each command imports them where it loads a model): a fresh process, so that
    nothing imported by the test run counts."""
    import subprocess
    import sys

    script = ("import contextlib, io, sys\nfrom ldm_cli import cli\ncodes = []\n"
              "for argv in (['--help'], ['sample', '--help'], ['train', '--help'], ['sample', 'x', '--steps', '0'],\n"
              "             ['train', 'data', '--lr', '-1'], ['train', 'no-such-folder']):\n"
              "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
              "        try:\n            cli.main(argv)\n        except SystemExit as e:\n            codes.append(e.code)\n"
              "print(*codes, sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "0", "0", "2", "2", "2", "[]"], r.stdout
