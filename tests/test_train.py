"""`ldm train` on a generated folder of coloured shapes with the tiny model (CPU)."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from ldm_cli.errors import LdmError
from ldm_cli.jobs import Settings
from ldm_cli.models.load import load_components
from ldm_cli.sample import pipeline
from ldm_cli.train.config import TrainConfig
from ldm_cli.train.config_file import read_config
from ldm_cli.train.loop import train


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_finetune_lowers_loss_and_loads_in_diffusers(shapes, tiny_model, tmp_path):
    cfg = TrainConfig(data_dir=str(shapes), model=str(tiny_model), out_dir=str(tmp_path / "run"), max_steps=60,
                      batch_size=4, lr=1e-3, seed=1, device="cpu", cache_dir=str(tmp_path / "cache"))
    model_dir = train(cfg)
    ls = losses(tmp_path / "run")
    first, last = np.mean(ls[:10]), np.mean(ls[-10:])
    print(f"fine-tune loss: first 10 steps {first:.4f}, last 10 steps {last:.4f}")
    assert len(ls) == 60 and last < 0.8 * first
    assert "no-caption.png: no caption" in (tmp_path / "run" / "skipped.txt").read_text()
    # Interop: plain diffusers loads the folder, and its DDIM image equals ours.
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    theirs = pipe("a red circle", num_inference_steps=10, guidance_scale=7.5, output_type="np",
                  generator=torch.Generator("cpu").manual_seed(4)).images
    c = load_components(str(model_dir), device="cpu")
    ours = pipeline.txt2img(c, ["a red circle"], [""], [4], Settings(steps=10, width=64, height=64))
    assert np.abs(ours.permute(0, 2, 3, 1).numpy() - theirs).max() <= 1e-5


def unet_weights(model_dir):
    return load_components(str(model_dir), device="cpu").unet.state_dict()


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def apart(a, b):
    """The distance between two state dicts of one model (float64, over every weight)."""
    return sum((a[k] - b[k]).double().square().sum() for k in a).sqrt()


def test_from_scratch_and_resume_is_bitwise(shapes, tiny_model, tmp_path):
    base = dict(data_dir=str(shapes), model=str(tiny_model), from_scratch=True, unet_config="tiny", max_steps=8,
                batch_size=2, lr=1e-3, seed=3, device="cpu", caption_dropout=0.25, cache_dir=str(tmp_path / "c"),
                ema=True, noise_offset=0.05, min_snr_gamma=5.0, gradient_accumulation=2)
    straight = train(TrainConfig(out_dir=str(tmp_path / "straight"), **base))
    half = TrainConfig(out_dir=str(tmp_path / "resumed"), **{**base, "max_steps": 4})
    train(half)
    resumed = train(TrainConfig(out_dir=str(tmp_path / "resumed"), **base), resume="latest")
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    assert same_weights(unet_weights(straight), unet_weights(resumed))
    assert same_weights(unet_weights(tmp_path / "straight" / "model-ema"), unet_weights(tmp_path / "resumed" / "model-ema"))
    assert not same_weights(unet_weights(straight), unet_weights(tmp_path / "straight" / "model-ema"))



def test_a_channels_last_unet_trains_saves_and_resumes(shapes, tiny_model, tmp_path, monkeypatch):
    """Compiled CUDA runs train the U-Net in channels_last (train/fast.py): its checkpoints, EMA and saved
    folder must hold plain weights and resume exactly. The layout forced here on the CPU: the same losses as
    the contiguous run up to the convolutions' rounding, a resumed run bitwise the unbroken one."""
    from ldm_cli.train import fast

    laid_out = []

    def channels_last(unet, mode, device, channels_last=None):
        unet.to(memory_format=torch.channels_last)
        laid_out.append(unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last))

    base = dict(data_dir=str(shapes), model=str(tiny_model), max_steps=6, batch_size=2, lr=1e-3, seed=4,
                device="cpu", cache_dir=str(tmp_path / "c"), ema=True, checkpoint_every=3)
    plain = train(TrainConfig(out_dir=str(tmp_path / "plain"), **base))
    monkeypatch.setattr(fast, "speed_up", channels_last)
    straight = train(TrainConfig(out_dir=str(tmp_path / "straight"), **base))
    train(TrainConfig(out_dir=str(tmp_path / "resumed"), **{**base, "max_steps": 3}))
    resumed = train(TrainConfig(out_dir=str(tmp_path / "resumed"), **base), resume="latest")
    assert laid_out == [True] * 3
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    assert same_weights(unet_weights(straight), unet_weights(resumed))
    assert np.allclose(losses(tmp_path / "plain"), losses(tmp_path / "straight"), rtol=1e-3)
    a, b, start = unet_weights(plain), unet_weights(straight), unet_weights(tiny_model)
    assert a.keys() == b.keys()
    # Adam's steps turn the rounding of near-zero gradients into whole ones: measured against how far training
    # moved the weights
    assert apart(a, b) < 1e-2 * apart(a, start), (apart(a, b), apart(a, start))
    assert all(w.is_contiguous() for w in unet_weights(tmp_path / "straight" / "model-ema").values())


def test_a_resume_in_the_other_layout_keeps_fused_adams_moments_right(shapes, tiny_model, tmp_path, monkeypatch):
    """A checkpoint written in NCHW resumed in channels_last (`--compile none` then `full` on CUDA, or `auto`
    changing its mind as --max-steps grows): fused AdamW reads a parameter and its moments as flat arrays, so the
    saved moments must take the parameter's layout, or the update is silently permuted. Fused AdamW (CUDA's) on
    the CPU here; the resumed run against the unbroken one, up to channels_last convolutions' rounding."""
    from ldm_cli.train import fast

    def fused(cfg, params):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2, fused=True)

    def channels_last(unet, mode, device, channels_last=None):
        unet.to(memory_format=torch.channels_last)

    monkeypatch.setattr("ldm_cli.train.loop.build_optimizer", fused)
    base = dict(data_dir=str(shapes), model=str(tiny_model), max_steps=6, batch_size=2, lr=1e-3, seed=4,
                device="cpu", cache_dir=str(tmp_path / "c"), ema=True, checkpoint_every=3)
    straight = train(TrainConfig(out_dir=str(tmp_path / "straight"), **base))
    train(TrainConfig(out_dir=str(tmp_path / "resumed"), **{**base, "max_steps": 3}))
    monkeypatch.setattr(fast, "speed_up", channels_last)
    resumed = train(TrainConfig(out_dir=str(tmp_path / "resumed"), **base), resume="latest")
    assert np.allclose(losses(tmp_path / "straight"), losses(tmp_path / "resumed"), rtol=1e-3)
    a, b, start = unet_weights(straight), unet_weights(resumed), unet_weights(tiny_model)
    assert apart(a, b) < 1e-2 * apart(a, start), (apart(a, b), apart(a, start))
    ema_a, ema_b = unet_weights(tmp_path / "straight" / "model-ema"), unet_weights(tmp_path / "resumed" / "model-ema")
    assert apart(ema_a, ema_b) < 1e-2 * apart(a, start)


@pytest.mark.slow
def test_train_cli(ldm, ldm_here, shapes, tiny_model, tmp_path):
    r = ldm("train", shapes, "--model", tiny_model, "--out", tmp_path / "run", "--resolution", 64,
            "--epochs", 0.25, "--batch-size", 2, "--device", "cpu", "-q", "--cache-dir", tmp_path / "c")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "run" / "model")
    assert len(losses(tmp_path / "run")) == 4  # a quarter of 32 examples in steps of 2
    s = ldm_here("sample", "a red circle", "--model", tmp_path / "run" / "model", "--steps", 2, "--out",
                 tmp_path / "o", "-q")
    assert s.returncode == 0 and len(list((tmp_path / "o").glob("*.png"))) == 1, s.stderr
    bad = ldm_here("train", tmp_path / "nothing", "--model", tiny_model, "--out", tmp_path / "run2")
    expected = f"ldm: error: {tmp_path / 'nothing'}: data folder not found"
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "run2").exists()


def test_train_defaults_to_the_models_size_and_logs_every_n_steps(ldm_here, shapes, tiny_model, tmp_path):
    """No --resolution: the model's native size (64 px here, not 512); piped output: one line per
    --log-every steps (and the last), not one per step."""
    r = ldm_here("train", shapes, "--model", tiny_model, "--out", tmp_path / "run", "--max-steps", 7, "--log-every", 3,
            "--batch-size", 2, "--device", "cpu", "--cache-dir", tmp_path / "c")
    assert r.returncode == 0, r.stderr
    steps = [line.split()[1] for line in r.stderr.splitlines() if line.startswith("step ")]
    assert steps == ["3/7", "6/7", "7/7"], r.stderr
    saved = json.loads((tmp_path / "run" / "checkpoints" / "step-0000007" / "config.json").read_text())
    assert saved["train"]["resolution"] == 64 and saved["train"]["max_steps"] == 7


@pytest.mark.slow
def test_lora_trains_and_matches_diffusers_load_lora_weights(shapes, tiny_model, tmp_path, ldm):
    from ldm_cli.models.options import LoadOptions
    from ldm_cli.sample.run import load

    cfg = TrainConfig(data_dir=str(shapes), model=str(tiny_model), out_dir=str(tmp_path / "run"), lora_rank=4,
                      max_steps=40, batch_size=4, lr=3e-3, seed=1, device="cpu", cache_dir=str(tmp_path / "c"))
    lora_dir = train(cfg)
    ls = losses(tmp_path / "run")
    print(f"LoRA loss: first 10 steps {np.mean(ls[:10]):.4f}, last 10 steps {np.mean(ls[-10:]):.4f}")
    assert np.mean(ls[-10:]) < np.mean(ls[:10])
    lora_file = lora_dir / "pytorch_lora_weights.safetensors"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    base = pipe("a red circle", num_inference_steps=10, output_type="np", generator=torch.Generator().manual_seed(4))
    pipe.load_lora_weights(str(lora_dir), weight_name=lora_file.name)
    theirs = pipe("a red circle", num_inference_steps=10, output_type="np", cross_attention_kwargs={"scale": 0.7},
                  generator=torch.Generator().manual_seed(4)).images
    model = load(LoadOptions(model=str(tiny_model), device="cpu", dtype="fp32", accel="none", lora=str(lora_file),
                             lora_scale=0.7))
    ours = pipeline.txt2img(model.components, ["a red circle"], [""], [4], Settings(steps=10, width=64, height=64),
                            unet=model.unet)
    ours = ours.permute(0, 2, 3, 1).numpy()
    print(f"LoRA vs diffusers max abs diff {np.abs(ours - theirs).max():.2e}; "
          f"LoRA effect {np.abs(ours - base.images).max():.3f}")
    assert np.abs(ours - theirs).max() <= 1e-5 and np.abs(ours - base.images).max() > 1e-3
    r = ldm("sample", "a red circle", "--model", tiny_model, "--lora", lora_dir, "--lora-scale", 0.7,
            "--steps", 10, "--seed", 4, "--out", tmp_path / "o", "--json")
    assert r.returncode == 0, r.stderr
    png = Image.open(json.loads(r.stdout)[0]["path"])
    assert f"Lora: {lora_dir}@0.7" in png.text["parameters"]
    assert np.abs(np.asarray(png, dtype=np.float32) / 255 - ours[0]).max() <= 1 / 255 + 1e-6


def test_latent_cache_is_reused_and_changes_nothing(shapes, tiny_model, tmp_path):
    notes = []
    base = dict(data_dir=str(shapes), model=str(tiny_model), max_steps=6, batch_size=4, lr=1e-3, seed=2,
                device="cpu", cache_dir=str(tmp_path / "cache"))
    for name in ("first", "second"):
        train(TrainConfig(out_dir=str(tmp_path / name), **base), say=notes.append)
    train(TrainConfig(out_dir=str(tmp_path / "uncached"), **{**base, "cache": False}), say=notes.append)
    print("\n".join(notes))
    firsts = [n for n in notes if n.startswith("first step done")]
    notes = [n for n in notes if n.startswith("latent cache")]
    assert len(firsts) == 3 and all("(compile: none;" in n for n in firsts)  # auto: no compile on a CPU
    for n in firsts:  # the phases add up to the time from the start; the command (this process) began earlier
        total, command = (float(x) for x in re.findall(r"([0-9.]+) s after the", n))
        parts = [float(x) for x in re.findall(r"(?:models|data|set-up|the step) ([0-9.]+) s", n)]
        assert len(parts) == 4 and abs(sum(parts) - total) <= 0.25 and command >= total, n
    assert "41 entries encoded, 0 reused" in notes[0]  # 32 images, 8 captions + the empty one
    assert "0 entries encoded, 41 reused" in notes[1] and len(notes) == 2
    assert losses(tmp_path / "first") == losses(tmp_path / "second") == losses(tmp_path / "uncached")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="counts the process's memory mappings (Linux)")
def test_cache_entries_are_read_into_memory_not_mapped(tmp_path):
    """Each mapped entry held one of the process's ~65k mappings: a 60k-image folder's resume hung."""
    from safetensors.torch import save_file

    from ldm_cli.train.cache import _load_entry

    paths = []
    for i in range(200):
        paths.append(tmp_path / f"{i}.safetensors")
        save_file({"moments": torch.full((8, 4, 4), float(i))}, paths[-1])
    maps = lambda: len(Path("/proc/self/maps").read_text().splitlines())  # noqa: E731
    before = maps()
    held = [_load_entry(p, ("moments",)) for p in paths]
    assert maps() - before < 20, maps() - before  # load_file: +200
    assert [float(t[0, 0, 0]) for t in held] == [float(i) for i in range(200)]


def test_cache_threads_give_the_same_entries_in_order(tmp_path, monkeypatch):
    """Large images go to the pool's threads in runs of neighbours, small ones to one thread: the same entries,
    in the same order, either way (and an unreadable image skipped in both)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from ldm_cli.train import cache
    from ldm_cli.train.data import Example

    with ThreadPoolExecutor(3) as pool:
        for parts in (1, 2, 3, 7, 50):
            assert cache._map_in_parts(pool, lambda x: x * x, list(range(7)), parts) == [x * x for x in range(7)]
    rng = np.random.default_rng(0)
    examples = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).resize((96, 96)).save(path)
        examples.append(Example(path, f"photo {i}"))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    examples.insert(2, Example(tmp_path / "bad.png", "broken"))
    runs, threads, load_pixels = [], set(), cache.load_pixels

    def recorded(*a):
        threads.add(threading.get_ident())
        return load_pixels(*a)

    monkeypatch.setattr(cache, "load_pixels", recorded)
    for threshold in (0, 10 ** 12):  # every image threaded / every image in one thread
        monkeypatch.setattr(cache, "THREADED_FROM_PIXELS", threshold)
        threads.clear()
        got = cache.encode_dataset(examples, tmp_path / f"cache{threshold}", 64,
                                   lambda x: x[:, :2, ::8, ::8].clone(), lambda c: torch.zeros(len(c), 4, 8),
                                   batch_size=8)
        assert len(got.moments) == 5 and len(got.skipped) == 1 and "bad.png" in got.skipped[0]
        runs.append([got.moments[e.path] for e in examples if e.path in got.moments])
    assert len(threads) == 1  # the last: one batch of small images, decoded in one task (one thread)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0][0], runs[0][1])  # each image its own entry


@pytest.mark.slow
def test_accelerate_launch_one_process_equals_plain_run(shapes, tiny_model, tmp_path, ldm_here):
    import subprocess
    import sys

    args = [str(shapes), "--model", str(tiny_model), "--resolution", "64", "--max-steps", "3", "--batch-size", "2",
            "--device", "cpu", "-q", "--cache-dir", str(tmp_path / "c")]
    plain = ldm_here("train", *args, "--out", tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr
    launched = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
                               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                               "--num_cpu_threads_per_process", "1",
                               "-m", "ldm_cli", "train", *args, "--out", str(tmp_path / "launched")],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert launched.returncode == 0, launched.stderr
    assert losses(tmp_path / "plain") == losses(tmp_path / "launched")
    assert same_weights(unet_weights(tmp_path / "plain" / "model"), unet_weights(tmp_path / "launched" / "model"))


def test_resume_applies_a_changed_lr_and_says_so(shapes, tiny_model, tmp_path):
    base = dict(data_dir=str(shapes), model=str(tiny_model), out_dir=str(tmp_path / "run"), max_steps=3, batch_size=2,
                lr=1e-3, seed=2, device="cpu", cache_dir=str(tmp_path / "c"), checkpoint_every=3)
    train(TrainConfig(**base))
    notes = []
    train(TrainConfig(**{**base, "max_steps": 5, "lr": 2e-4}), resume="latest", say=notes.append)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert lrs == [1e-3] * 3 + [2e-4] * 2  # the new lr from the checkpoint's step on, not the saved one
    said = [n for n in notes if n.startswith("resume:")]
    assert len(said) == 1 and "lr 0.001 -> 0.0002" in said[0] and "applied" in said[0], notes


def test_resume_refuses_a_changed_model_shape(shapes, tiny_model, tmp_path):
    import pytest

    from ldm_cli.errors import LdmError

    base = dict(data_dir=str(shapes), model=str(tiny_model), out_dir=str(tmp_path / "run"), max_steps=2, batch_size=2,
                device="cpu", cache_dir=str(tmp_path / "c"), lora_rank=4)
    train(TrainConfig(**base))
    with pytest.raises(LdmError, match=r"lora_rank 4 -> 8.*start a new run") as e:
        train(TrainConfig(**{**base, "max_steps": 4, "lora_rank": 8}), resume="latest")
    assert e.value.exit_code == 2
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000002"]


def test_validation_grid_uses_the_chosen_sampler(shapes, tiny_model, tmp_path):
    """The grid is the pipeline's own images of the validation prompts (seed k for prompt k) with the
    trained weights, sampled with --validation-sampler."""
    grids = {}
    for sampler in ("ddim", "euler-a"):
        out = tmp_path / sampler
        cfg = TrainConfig(data_dir=str(shapes), model=str(tiny_model), out_dir=str(out), max_steps=2, batch_size=2,
                          seed=1, device="cpu", cache_dir=str(tmp_path / "cache"), validate_every=2,
                          validation_prompts=("a red circle", "a blue square"), validation_steps=4,
                          validation_sampler=sampler)
        model_dir = train(cfg)
        grid = sorted((out / "validation").glob("*.png"))
        assert [p.name for p in grid] == ["step-0000002.png"]
        grids[sampler] = np.asarray(Image.open(grid[0]).convert("RGB"))
        c = load_components(str(model_dir), device="cpu")
        s = Settings(steps=4, width=64, height=64, sampler=sampler)
        first = pipeline.txt2img(c, ["a red circle"], [""], [0], s)[0].permute(1, 2, 0).numpy()
        assert grids[sampler].shape[:2] == (64, 128)  # the two prompts side by side
        assert np.abs(grids[sampler][:, :64].astype(float) / 255 - first).max() <= 1 / 255 + 1e-6
    assert np.abs(grids["ddim"].astype(int) - grids["euler-a"]).max() > 10


def test_config_file_round_trips_and_flags_win(ldm_here, shapes, tiny_model, tmp_path):
    """OUT/config.toml holds the resolved settings; `ldm train --config OUT/config.toml --out NEW` repeats the
    run (same losses); a flag given on the command line wins over the file; bad keys and types: one line."""
    common = ("--model", tiny_model, "--resolution", 64, "--batch-size", 2, "--device", "cpu", "-q", "--cache-dir",
              tmp_path / "c", "--seed", 3, "--lr", 2e-3)
    r = ldm_here("train", shapes, *common, "--max-steps", 4, "--log-every", 1, "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    toml = (tmp_path / "a" / "config.toml").read_text()
    assert f'data_dir = "{shapes}"' in toml and "max_steps = 4" in toml and "lr = 0.002" in toml
    r = ldm_here("train", "--config", tmp_path / "a" / "config.toml", "--out", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert f'out_dir = "{tmp_path / "b"}"' in (tmp_path / "b" / "config.toml").read_text()  # the flag won
    bad = tmp_path / "bad.toml"
    for text, says in (("max_step = 3", "unknown key 'max_step'; did you mean 'max_steps'?"),
                       ("batch_size = \"4\"", "batch_size = \"4\": expected int, got str"),
                       ("random_flip = 1", "expected true or false"), ("lr = [1]", "expected a number"),
                       ("validation_prompts = \"x\"", "expected a list of strings"), ("lr = = 1", "not TOML")):
        bad.write_text(text + "\n")
        with pytest.raises(LdmError, match=re.escape(says)):
            read_config(bad)
    r = ldm_here("train", shapes, "--config", bad, "--out", tmp_path / "x")
    assert r.returncode == 2 and "not TOML" in r.stderr and r.stderr.count("\n") == 1


def test_the_logged_images_per_second_is_the_rate_since_the_last_flush(tmp_path, monkeypatch):
    """A slow first window (compiling) must not drag down the rate shown for later steps."""
    from ldm_cli.train import log as losslog

    clock = iter([0.0, 100.0, 101.0])  # start; a first flush after 100 s of compiling; the next 1 s later
    monkeypatch.setattr(losslog.time, "perf_counter", lambda: next(clock))
    shown = []
    log = losslog.LossLog(tmp_path / "log.jsonl", True, 4, lambda r, _: shown.append(r))
    log.add(1, torch.tensor(0.5), 1e-4, 256)
    log.flush()
    log.add(2, torch.tensor(0.4), 1e-4, 256)
    log.add(3, torch.tensor(0.3), 1e-4, 256)
    log.flush()
    assert [r["images_per_s"] for r in shown] == [2.56, 512.0, 512.0]
    assert [r["elapsed_s"] for r in shown] == [100.0, 101.0, 101.0]
    assert [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_batches_gathered_from_a_device_store_equal_the_stacked_ones():
    """On CUDA the cache's tensors are kept on the GPU and each batch gathered there; here the same store is
    built on the CPU: every batch (caption dropout included) must equal the stacked one, and a store is refused
    when it would not fit or the moments differ in shape."""
    from pathlib import Path
    from types import SimpleNamespace

    from ldm_cli.train.batches import Batches
    from ldm_cli.train.cache import EncodedData
    from ldm_cli.train.config import TrainConfig
    from ldm_cli.train.data import Example

    g = torch.Generator().manual_seed(0)
    examples = [Example(Path(f"/d/{i}.png"), f"caption {i % 5}") for i in range(23)]
    cached = EncodedData({e.path: torch.randn(8, 4, 4, generator=g) for e in examples},
                         {c: torch.randn(77, 16, generator=g) for c in {e.caption for e in examples} | {""}}, 0, 0, [])
    fake = SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), trained_text=None,
                           c=SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(scaling_factor=0.5)),
                                             family="sd"))
    cfg = TrainConfig(data_dir="x", seed=3, batch_size=6, caption_dropout=0.3)
    plain, stored = Batches(cfg, examples, fake, cached, 1, 0), Batches(cfg, examples, fake, cached, 1, 0)
    assert plain.store is None  # only on CUDA by itself
    stored.store = stored._device_store(cached, free_bytes=10**9)
    assert stored.store is not None and stored.store[0].shape == (23, 8, 4, 4) and len(stored.store[2]) == 6
    dropped = 0
    for step in range(8):
        (za, ca), (zb, cb) = (b.batch(step, 0, torch.Generator().manual_seed(step)) for b in (plain, stored))
        assert torch.equal(za, zb) and torch.equal(ca, cb)
        dropped += int((ca == cached.context[""]).all(dim=(1, 2)).sum())
    assert dropped > 0  # caption dropout was exercised
    assert stored._device_store(cached, free_bytes=1000) is None  # would not fit
    cached.moments[examples[0].path] = torch.randn(8, 4, 6)
    assert stored._device_store(cached, free_bytes=10**9) is None  # moments of two shapes (buckets)


def test_the_step_clips_the_gradients_of_what_trains_to_max_grad_norm(monkeypatch):
    """train_step clips the norm of the trained parameters' gradients (the optimizer's own lists) to
    --max-grad-norm before the step, and leaves them alone with 0; frozen parameters get no gradient."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from ldm_cli.train import loop

    monkeypatch.setattr(loop, "diffusion_loss", lambda unet, schedule, latents, *a, **k: 100 * unet(latents).square().sum())
    seen = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            seen.append(float(torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"]]).norm()))
            return super().step(closure)

    for clip in (0.01, 0.0):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4).requires_grad_(False))
        optimizer = Recording(model[0].parameters(), lr=0.1)
        feeds = (SimpleNamespace(batch=lambda step, micro, gen: (torch.ones(3, 4), None), share=None), None)
        lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        cfg = TrainConfig(data_dir="x", max_grad_norm=clip)
        loss = loop.train_step(cfg, model, model, None, feeds, optimizer, lr_sched, Accelerator(), 0)
        assert float(loss) > 0 and model[1].weight.grad is None
    assert seen[0] == pytest.approx(0.01, rel=1e-4) and seen[1] > 1  # clipped; then unclipped, far above it


def test_pinned_staging_reuses_its_buffers_only_after_the_gpu_read_them():
    """The step's host->GPU copies go through `depth` reused buffers per shape: no new pinned allocation once
    the ring is full, each buffer written again only after waiting on the event recorded after its last copy,
    and every copy its own tensor (a reused buffer never shows through an earlier step's batch). The CUDA
    parts (pinned memory, events) are stand-ins here; the copy's order of operations is the real one."""
    from ldm_cli.train.loss import PinnedStaging

    log, made = [], []

    class Event:
        def record(self, stream):
            assert stream == "the copy's stream"
            log.append(("record", id(self)))

        def synchronize(self):
            log.append(("wait", id(self)))

    def pinned(shape, dtype):
        made.append(shape)
        return torch.empty(shape, dtype=dtype)

    staging = PinnedStaging(depth=3, pinned=pinned, event=Event, stream=lambda device: "the copy's stream")
    cpu = torch.device("cpu")
    sent = [torch.randn(2, 4) for _ in range(10)] + [torch.arange(5)]
    got = [staging.copy(t, cpu) for t in sent]
    assert all(torch.equal(a, b) for a, b in zip(sent, got))  # earlier copies unchanged by the buffers' reuse
    assert made == [torch.Size([2, 4])] * 3 + [torch.Size([5])]  # one ring per shape, filled once
    events = [e for kind, e in log if kind == "record"][:3]
    waits = [e for kind, e in log if kind == "wait"]
    assert waits == (events * 3)[:7]  # the 4th..10th copies each waited on the oldest buffer's event
    for k, (kind, e) in enumerate(log):  # ... recorded before that wait
        assert kind == "record" or ("record", e) in log[:k]


def test_compile_modes_resolve_by_device_length_and_layout():
    from ldm_cli.train.fast import AUTO_COMPILE_MIN_STEPS, WARM_COMPILE_MIN_STEPS, compile_mode

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert compile_mode("auto", cuda, AUTO_COMPILE_MIN_STEPS) == "full"
    assert compile_mode("auto", cuda, AUTO_COMPILE_MIN_STEPS - 1) == "none"  # a cold compile would not pay back
    assert compile_mode("auto", cpu, 10**6) == compile_mode("full", cpu, 10) == compile_mode("graphs", cpu, 10) == "none"
    assert compile_mode("graphs", cuda, 10) == "graphs"
    assert compile_mode("graphs", cuda, 10, world=2) == "full"  # DDP all-reduces mid-backward
    assert compile_mode("graphs", cuda, 10, accumulation=2) == "full"  # gradients kept across micro-batches
    # a small U-Net's step, paced by the host's launches, is graphed; still full where graphs cannot own the step
    assert compile_mode("auto", cuda, AUTO_COMPILE_MIN_STEPS, small=True) == "graphs"
    assert compile_mode("auto", cuda, AUTO_COMPILE_MIN_STEPS - 1, small=True) == "none"
    # the same step compiled on this machine before: inductor's cache makes a compile pay back sooner
    assert compile_mode("auto", cuda, WARM_COMPILE_MIN_STEPS, warm=True) == "full"
    assert compile_mode("auto", cuda, WARM_COMPILE_MIN_STEPS, small=True, warm=True) == "graphs"
    assert compile_mode("auto", cuda, WARM_COMPILE_MIN_STEPS - 1, warm=True) == "none"
    assert compile_mode("auto", cpu, 10**6, warm=True) == "none"
    assert compile_mode("auto", cuda, AUTO_COMPILE_MIN_STEPS, world=2, small=True) == "full"
    assert compile_mode("auto", cuda, AUTO_COMPILE_MIN_STEPS, accumulation=4, small=True) == "full"
    assert compile_mode("auto", cpu, 10**6, small=True) == "none"


def test_quantized_moments_of_another_layout_are_refused_not_permuted():
    """8-bit AdamW's moments are quantized in blocks of the flat array: moved to another layout, each would be
    read with another block's scale, so a resume across layouts with them is refused; float moments move."""
    from ldm_cli.train.optim import moments_laid_out_as_params

    p = torch.nn.Parameter(torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last))
    saved = torch.randn(4, 3, 3, 3)
    optimizer = torch.optim.AdamW([p])
    optimizer.state[p] = {"exp_avg": saved.clone(), "step": torch.tensor(3.0)}
    moments_laid_out_as_params(optimizer)
    assert optimizer.state[p]["exp_avg"].stride() == p.stride() and torch.equal(optimizer.state[p]["exp_avg"], saved)
    optimizer.state[p] = {"state1": torch.zeros(4, 3, 3, 3, dtype=torch.uint8)}
    with pytest.raises(LdmError, match="resume with the --compile it was written with"):
        moments_laid_out_as_params(optimizer)
    one_by_one = torch.nn.Parameter(torch.randn(4, 3, 1, 1).to(memory_format=torch.channels_last))
    optimizer.state = {one_by_one: {"state1": torch.zeros(4, 3, 1, 1, dtype=torch.uint8)}}
    moments_laid_out_as_params(optimizer)  # a 1x1 weight is the same array in either layout: nothing to refuse


def test_on_cuda_full_compiles_in_channels_last_with_group_norm_from_channel_statistics():
    """train/fast.py's layout lever, as shipped: `full` (measured +8.2% on an H100) trains the U-Net in
    channels_last with its GroupNorms from per-channel statistics and the layout's inductor options; the other
    modes keep NCHW and torch's GroupNorm; off CUDA nothing changes."""
    from ldm_cli.accel.groupnorm import ChannelStatsGroupNorm
    from ldm_cli.train import fast

    class UNetLike(torch.nn.Module):  # records how it was compiled
        def __init__(self):
            super().__init__()
            self.norm, self.conv = torch.nn.GroupNorm(2, 4), torch.nn.Conv2d(4, 4, 3)

        def compile(self, **kw):
            self.compiled_with = kw

    made = {}
    for device, mode in [("cuda", m) for m in ("none", "regional", "full", "graphs")] + [("cpu", "full")]:
        unet = UNetLike()
        fast.speed_up(unet, mode, torch.device(device))
        made[device, mode] = (unet.conv.weight.is_contiguous(memory_format=torch.channels_last),
                              type(unet.norm) is ChannelStatsGroupNorm, getattr(unet, "compiled_with", None))
    layout, by_channel, kw = made["cuda", "full"]
    assert layout and by_channel and kw["options"]["conv_1x1_as_mm"]
    assert all(not cl and not gn for (device, mode), (cl, gn, _) in made.items() if (device, mode) != ("cuda", "full"))
    assert made["cuda", "graphs"][2] == {"mode": "reduce-overhead"} and made["cpu", "full"][2] is None


def test_compile_auto_says_its_choice_on_cuda_only():
    from ldm_cli.train.fast import chosen_compile

    def said(mode, device, steps, params=860_000_000, **options):
        notes = []
        chosen = chosen_compile(TrainConfig(data_dir="-", compile=mode, **options), torch.device(device), steps, 1,
                                notes.append, params)
        return chosen, notes

    assert said("auto", "cuda", 5000) == ("full", ["--compile auto: full for 5000 steps (at least 2000, where a first "
                                                   "compile, ~2-3.5 min for SD-1.5, pays back; --compile none to choose "
                                                   "otherwise)"])
    assert said("auto", "cuda", 300)[0] == "none" and "fewer than 2000" in said("auto", "cuda", 300)[1][0]
    assert said("auto", "cpu", 5000) == ("none", [])  # nothing compiles on a CPU: nothing to say
    assert said("full", "cuda", 10) == ("full", [])
    # the embedded model's U-Net (12M parameters): graphed, and said why, with LoRA and gradient checkpointing too
    # (tests/test_gpu.py: each trains graphed as eager); not a U-Net of GRAPHS_MAX_PARAMS
    assert said("auto", "cuda", 5000, 12_228_772) == ("graphs", [
        "--compile auto: graphs for 5000 steps (at least 2000, where a first compile, ~2-3.5 min for SD-1.5, pays back; "
        "graphs: a U-Net of 12M parameters, whose steps CUDA graphs replay 2-3x faster; --compile full or none to "
        "choose otherwise)"])
    assert said("auto", "cuda", 5000, 12_228_772, lora_rank=8)[0] == "graphs"
    assert said("auto", "cuda", 5000, 12_228_772, gradient_checkpointing=True)[0] == "graphs"
    assert said("auto", "cuda", 5000, 12_228_772, gradient_accumulation=2)[0] == "full"  # several micro-batches
    assert said("auto", "cuda", 5000, 100_000_000)[0] == "full"
    assert said("auto", "cuda", 300, 12_228_772)[0] == "none"


def test_compile_auto_compiles_a_shorter_run_whose_step_this_machine_compiled_before(tmp_path, monkeypatch):
    """A run of 500 steps (fewer than a cold compile pays back in) compiles once a run of the same step noted its
    compile, said so; a step of another batch, data shape, U-Net or mode is not the noted one; the notes live in
    inductor's cache folder, so clearing that cache clears them."""
    import sys
    from dataclasses import replace

    from ldm_cli.train import fast

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    cuda = torch.device("cuda")
    config = {"block_out_channels": [320, 640], "_name_or_path": "/a/folder", "_use_default_values": ["b", "a"]}

    def key_of(cfg, shapes=frozenset({None}), unet=config):
        return lambda mode: fast.compile_key(mode, unet, fast.step_settings(cfg, 1, shapes), cuda)

    def chosen(cfg, steps=500, **key):
        notes = []
        return fast.chosen_compile(cfg, cuda, steps, 1, notes.append, 860_000_000, key_of(cfg, **key)), notes

    cfg = TrainConfig(data_dir="-", resolution=512, batch_size=32, mixed_precision="bf16")
    assert chosen(cfg)[0] == "none"  # nothing noted: a cold compile does not pay back in 500 steps
    fast.remember_compiled(key_of(cfg)("full"))
    assert (tmp_path / "inductor" / "ldm-compiled").is_dir()
    assert chosen(cfg) == ("full", ["--compile auto: full for 500 steps (this step was compiled on this machine "
                                    "before: from inductor's cache it starts in seconds and pays back after ~200 "
                                    "steps; --compile none to choose otherwise)"])
    assert chosen(cfg, steps=fast.WARM_COMPILE_MIN_STEPS - 1)[0] == "none"
    # diffusers' bookkeeping is not the step: another folder, the defaults listed in another order
    assert chosen(cfg, unet={**config, "_name_or_path": "/b", "_use_default_values": ["a", "b"]})[0] == "full"
    assert chosen(replace(cfg, batch_size=16))[0] == "none"
    assert chosen(cfg, shapes={(512, 768), None})[0] == "none"  # aspect-ratio buckets: other shapes
    assert chosen(cfg, unet={**config, "block_out_channels": [64, 128]})[0] == "none"
    assert chosen(replace(cfg, lora_rank=8))[0] == "none"
    assert chosen(replace(cfg, gradient_accumulation=2))[0] == "none"
    assert chosen(replace(cfg, compile="none"))[0] == "none"  # asked for: as asked
    fast.remember_compiled(key_of(cfg)("regional"))  # another mode's note makes no other run warm
    assert chosen(replace(cfg, batch_size=8))[0] == "none"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "another GPU")
    assert chosen(cfg)[0] == "none"
    # were torch's private cache-folder module to move: the folder the CLI sets, the same notes
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    monkeypatch.setitem(sys.modules, "torch._inductor.runtime.cache_dir_utils", None)
    assert chosen(cfg)[0] == "full"


def test_compile_graphs_on_a_cpu_is_the_plain_step(shapes, tiny_model, tmp_path):
    notes = []
    base = dict(data_dir=str(shapes), model=str(tiny_model), max_steps=2, batch_size=2, lr=1e-3, seed=2,
                device="cpu", cache_dir=str(tmp_path / "cache"))
    train(TrainConfig(out_dir=str(tmp_path / "graphs"), compile="graphs", **base), say=notes.append)
    train(TrainConfig(out_dir=str(tmp_path / "none"), compile="none", **base))
    assert any("(compile: none;" in n for n in notes)  # said as it is: nothing compiled on a CPU
    assert "--compile graphs applies on CUDA only: this run on cpu is not compiled" in notes
    assert len(losses(tmp_path / "graphs")) == 2 and losses(tmp_path / "graphs") == losses(tmp_path / "none")


def test_warmup_steps_ramp_the_default_constant_schedule():
    """diffusers' `constant` ignores num_warmup_steps: `--warmup-steps 4` must still ramp the rate."""
    from ldm_cli.train.optim import build_schedule

    def rates(**kw):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = build_schedule(TrainConfig(data_dir="d", **kw), opt, max_steps=10)
        seen = []
        for _ in range(6):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return seen

    assert rates(warmup_steps=4) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert rates() == [1.0] * 6
    assert rates(warmup_steps=4, lr_scheduler="linear")[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(LdmError, match="piecewise_constant"):
        rates(warmup_steps=4, lr_scheduler="piecewise_constant")


def test_the_models_own_learning_rate_per_kind_of_run(ldm_here, shapes, tiny_model, tmp_path):
    """ldm_defaults.json's "train" sets the lr of a fine-tune and of a LoRA when --lr is not given (and says so);
    --lr still wins, a new U-Net (--from-scratch) is not the model's, and a bad value is one line. A fine-tuned
    model folder carries the file on."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "ldm_defaults.json").write_text(json.dumps({"cfg": 3.0, "train": {"full": {"lr": 2e-3},
                                                                              "lora": {"lr": 3e-3}}}))
    base = ("train", shapes, "--model", model, "--max-steps", 1, "--batch-size", 2, "--device", "cpu",
            "--cache-dir", tmp_path / "c")
    for name, extra, lr in (("full", (), 2e-3), ("lora", ("--lora-rank", 2), 3e-3), ("given", ("--lr", 5e-4), 5e-4),
                            ("scratch", ("--from-scratch",), 1e-4)):
        r = ldm_here(*base, *extra, "--out", tmp_path / name)
        assert r.returncode == 0, r.stderr
        assert [json.loads(line)["lr"] for line in (tmp_path / name / "log.jsonl").read_text().splitlines()] == [lr]
        assert ("this model's own" in r.stderr) == (name in ("full", "lora")), r.stderr
        assert f"lr = {lr}" in (tmp_path / name / "config.toml").read_text()  # the run repeats with its lr
    # a fine-tune keeps the model's defaults (sample starts from its cfg too); a new U-Net does not
    assert (tmp_path / "full" / "model" / "ldm_defaults.json").read_text() == (model / "ldm_defaults.json").read_text()
    assert not (tmp_path / "scratch" / "model" / "ldm_defaults.json").exists()
    r = ldm_here("info", model, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["training_lr"] == {"full": 2e-3, "lora": 3e-3}, r.stderr
    (model / "ldm_defaults.json").write_text(json.dumps({"train": {"lora": {"lr": "fast"}}}))
    r = ldm_here(*base, "--lora-rank", 2, "--out", tmp_path / "bad")
    assert r.returncode == 2 and "lora's lr must be a number in (0, 1), got 'fast'" in r.stderr, r.stderr


def test_compiled_training_keeps_inductors_cache_under_ldms(monkeypatch, tmp_path):
    """`ldm train --compile` kernels go where `ldm sample --accel compile` keeps them (torch's default, /tmp, is
    emptied at a reboot: a cold compile again, ~4 minutes for SD-1.5); a user's own setting wins."""
    from ldm_cli import runtime

    for var in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path))
    runtime.keep_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    assert os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    runtime.keep_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/elsewhere"
