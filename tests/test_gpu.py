"""The CUDA paths (CUDA graphs, torch.compile under a graph) against the plain runner, on the tiny
model. Marked `gpu`: skipped without CUDA; the GPU run is `python -m pytest -m gpu tests`."""

from dataclasses import replace

import numpy as np
import pytest
import test_folders
import test_textual_inversion
import torch

from ldm_cli.accel import build_runner
from ldm_cli.jobs import Settings
from ldm_cli.models.load import load_components
from ldm_cli.models.unet import plain_runner
from ldm_cli.sample import pipeline

pytestmark = pytest.mark.gpu
photos, stars = test_folders.photos, test_textual_inversion.stars  # fixtures: 5 aspect ratios; 8 stars, no captions


@pytest.fixture
def cuda_model(tiny_model):
    return load_components(str(tiny_model), device="cuda", dtype="fp32")


@pytest.mark.parametrize("mode", ["graphs", "compile"])
def test_runner_equals_plain_unet_call(cuda_model, mode):
    c = cuda_model
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(2, 4, 32, 32, device="cuda", generator=g)
    context = torch.randn(4, 77, 32, device="cuda", generator=g)
    t = torch.tensor(500, device="cuda")
    want = plain_runner(c)(x, t, context).clone()
    runner = build_runner(c, mode)
    got = runner(x, t, context).clone()
    again = runner(x * 0.5, t, context).clone()  # a replay with new inputs, not the captured ones
    # graphs replay eager's own kernels; compiled kernels fuse and reorder sums (seen: 1.5e-3 on outputs ~0.3)
    tol = 1e-4 if mode == "graphs" else 5e-3
    assert torch.allclose(got, want, atol=tol, rtol=tol), (got - want).abs().max()
    assert not torch.allclose(again, got)
    assert torch.allclose(again, plain_runner(c)(x * 0.5, t, context), atol=tol, rtol=tol)


def test_graphed_image_equals_eager_image(cuda_model):
    c = cuda_model
    s = Settings(steps=8, cfg=7.5, width=64, height=64)
    eager = pipeline.txt2img(c, ["a red cat", "a dog"], ["", ""], [3, 4], s)
    graphed = pipeline.txt2img(c, ["a red cat", "a dog"], ["", ""], [3, 4], s, unet=build_runner(c, "graphs"))
    assert graphed.shape == (2, 3, 64, 64)
    assert np.abs((graphed - eager).cpu().numpy()).max() <= 1e-3
    assert (graphed[0] - graphed[1]).abs().max() > 1e-3  # two prompts, two seeds: two pictures


def test_tiled_decode_on_cuda(cuda_model):
    c = cuda_model
    s = Settings(steps=3, cfg=7.5, width=160, height=128)
    tiled = pipeline.txt2img(replace(c, vae_tiling="on"), ["a red cat"], [""], [3], s)
    untiled = pipeline.txt2img(replace(c, vae_tiling="off"), ["a red cat"], [""], [3], s)
    assert tiled.shape == untiled.shape == (1, 3, 128, 160)
    assert 0 < (tiled - untiled).abs().max() < 0.5  # blended seams differ, the picture does not


@pytest.mark.parametrize("sampler, schedule", [("euler", "karras"), ("euler-a", "default"), ("heun", "default"),
                                               ("lms", "karras"), ("dpm2", "karras"), ("dpm2-a", "default"),
                                               ("dpm++2m", "karras"), ("dpm++2m-sde", "karras"),
                                               ("dpm++2m-sde-heun", "karras"), ("dpm++3m-sde", "karras"),
                                               ("unipc", "default"), ("ddpm", "default"), ("lcm", "default")])
def test_samplers_on_cuda_graphs_equal_eager(cuda_model, sampler, schedule):
    """Every sampler through the CUDA-graphed runner (float timesteps for the sigma samplers, int64 for the
    others) gives the eager image; the CPU-drawn step noise gives the CPU's picture up to kernel rounding."""
    s = Settings(steps=8, cfg=7.5, width=64, height=64, sampler=sampler, schedule=schedule)
    eager = pipeline.txt2img(cuda_model, ["a red cat"], [""], [3], s)
    graphed = pipeline.txt2img(cuda_model, ["a red cat"], [""], [3], s, unet=build_runner(cuda_model, "graphs"))
    cpu = pipeline.txt2img(load_components(str(cuda_model.name), device="cpu", dtype="fp32"), ["a red cat"], [""],
                           [3], s)
    assert torch.allclose(graphed, eager, atol=2e-3), (graphed - eager).abs().max()  # seen: <= 1.0e-3
    assert torch.allclose(eager.cpu(), cpu, atol=2e-3), (eager.cpu() - cpu).abs().max()


def test_sdxl_on_cuda_fp16(tiny_sdxl):
    """SDXL through the CUDA-graphed runner in fp16 (the AddedCond's three tensors copied into the graph's
    inputs; the VAE upcast to fp32 by load) gives the eager image, and diffusers' SDXL pipeline's in fp16
    up to kernel rounding."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    c = load_components(str(tiny_sdxl), device="cuda", dtype="fp16")
    assert next(c.vae.parameters()).dtype == torch.float32 and c.unet.dtype == torch.float16
    s = Settings(steps=6, cfg=5.0, width=64, height=64, original_size="128x96")
    eager = pipeline.txt2img(c, ["a red cat"], [""], [3], s)
    graphed = pipeline.txt2img(c, ["a red cat"], [""], [3], s, unet=build_runner(c, "graphs"))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, torch_dtype=torch.float16).to("cuda")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    ref = pipe("a red cat", num_inference_steps=6, guidance_scale=5.0, height=64, width=64, original_size=(96, 128),
               generator=torch.Generator("cpu").manual_seed(3), output_type="pt").images
    assert torch.allclose(graphed, eager, atol=2e-3), (graphed - eager).abs().max()
    assert torch.allclose(eager, ref.float(), atol=1e-2), (eager - ref.float()).abs().max()


def test_training_with_cuda_graphs_equals_eager_training(shapes, tiny_model, tmp_path):
    """`ldm train --compile graphs` (torch.compile's reduce-overhead: forward and backward replayed as CUDA
    graphs) trains as the eager step does: the same losses and weights up to the compiled kernels' rounding,
    with graphs recorded, none skipped; EMA and a validation pass (eager) in between do not disturb them."""
    import json

    from torch._dynamo.utils import counters

    from ldm_cli.train.config import TrainConfig
    from ldm_cli.train.loop import train

    base = dict(data_dir=str(shapes), model=str(tiny_model), max_steps=12, batch_size=4, lr=1e-3, seed=5,
                device="cuda", cache_dir=str(tmp_path / "cache"), ema=True, min_snr_gamma=5.0, validate_every=6,
                validation_prompts=("a red circle",))
    runs = {}
    counters.clear()
    for mode in ("none", "graphs"):
        out = train(TrainConfig(out_dir=str(tmp_path / mode), compile=mode, **base))
        log = [json.loads(line) for line in (tmp_path / mode / "log.jsonl").read_text().splitlines()]
        runs[mode] = (torch.tensor([r["loss"] for r in log if "loss" in r]),
                      load_components(str(out), device="cpu").unet.state_dict())
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] > 0  # graphs were recorded
    (eager, w_eager), (graphed, w_graphed) = runs["none"], runs["graphs"]
    assert len(eager) == len(graphed) == 12
    assert torch.allclose(graphed, eager, rtol=1e-3, atol=1e-4), (graphed - eager).abs().max()
    # Weights: Adam moves a weight whose gradient is ~0 by up to lr a step whatever its sign, so a sign the
    # kernels round differently shows as a max-abs gap of a few lr (2.0e-3 at lr 1e-3 on an H100); what must
    # agree is where training took the weights: the gap's norm against the distance they moved
    start = load_components(str(tiny_model), device="cpu").unet.state_dict()
    gap = sum((w_graphed[k].float() - w_eager[k].float()).square().sum() for k in w_eager).sqrt()
    moved = sum((w_eager[k].float() - start[k].float()).square().sum() for k in w_eager).sqrt()
    print(f"weights: gap {gap:.3e}, moved {moved:.3e}, ratio {gap / moved:.3e}")
    assert gap < 0.02 * moved, (gap, moved)


@pytest.mark.parametrize("case", ["buckets", "dreambooth", "textual inversion", "lora", "checkpointing",
                                  "selective checkpointing"])
def test_graphed_training_equals_eager_in_each_kind_of_run(case, photos, stars, tiny_model, tmp_path):
    """`--compile graphs` where a step is not one shape and one forward: aspect-ratio buckets (a graph per latent
    shape), DreamBooth (two forwards, the data's and the class images', before one backward), textual inversion
    (the frozen U-Net graphed, the gradient flowing out of it into the new token's vectors); and where the graphed
    U-Net is not plain: LoRA's adapters, gradient checkpointing's recomputed blocks (both graphed by `--compile
    auto` for small U-Nets since these passed on an H100), and selective checkpointing's (passed on an H100 too).
    The losses equal the eager run's up to the compiled kernels' rounding, with graphs recorded and none skipped."""
    from torch._dynamo.utils import counters

    from ldm_cli.train.config import TrainConfig
    from ldm_cli.train.loop import train

    base = dict(model=str(tiny_model), max_steps=8, batch_size=2, lr=1e-3, seed=2, device="cuda",
                cache_dir=str(tmp_path / "cache"), data_dir=str(photos))  # 13 pictures in 4 buckets
    if case == "dreambooth":
        instance = tmp_path / "sks"
        instance.mkdir()
        for p in sorted(photos.glob("1x1-*.png")):
            (instance / p.name).write_bytes(p.read_bytes())  # no captions: the instance prompt
        base.update(data_dir=str(instance), instance_prompt="photo of sks circle", class_data=str(tmp_path / "dogs"),
                    class_prompt="a red circle", num_class_images=2, validation_steps=2)  # drawn once, by the first
    elif case == "textual inversion":
        base.update(data_dir=str(stars), textual_inversion="zqx", init_word="square", vectors=2, lr=5e-3)
    elif case == "lora":
        base.update(lora_rank=4)
    elif case == "checkpointing":
        base.update(gradient_checkpointing=True)
    elif case == "selective checkpointing":
        base.update(selective_checkpointing=True)
    runs = {}
    counters.clear()
    for mode in ("none", "graphs"):
        train(TrainConfig(out_dir=str(tmp_path / mode), compile=mode, **base))
        runs[mode] = torch.tensor(test_folders.losses(tmp_path / mode))
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] > 0  # graphs were recorded
    assert len(runs["none"]) == len(runs["graphs"]) == 8
    assert torch.allclose(runs["graphs"], runs["none"], rtol=1e-3, atol=1e-4), (runs["graphs"] - runs["none"]).abs().max()


def test_group_norm_by_channel_under_cuda_autocast_compiled_channels_last():
    """As autocast runs torch's group_norm (in float32, a float32 result) and to float rounding of it, forward
    and backward, compiled over a channels_last bf16 input as a compiled U-Net's training step gives it."""
    import torch.nn.functional as F

    from ldm_cli.accel.groupnorm import group_norm_by_channel

    g = torch.Generator("cuda").manual_seed(0)
    x = (torch.randn(8, 320, 64, 64, device="cuda", generator=g) + 3).to(torch.bfloat16)
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    w, b = (torch.randn(320, device="cuda", generator=g).requires_grad_() for _ in range(2))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = F.group_norm(x, 32, w, b, 1e-5)
        got = torch.compile(group_norm_by_channel)(x, 32, w, b, 1e-5)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(want)
    for a, e in zip(torch.autograd.grad(got, (x, w, b), grad), torch.autograd.grad(want, (x, w, b), grad)):
        torch.testing.assert_close(a.float(), e.float(), rtol=2e-2, atol=2e-2)  # x's gradient in bf16


def test_compiled_channels_last_training_with_group_norm_by_channel_equals_eager(shapes, tiny_model, tmp_path,
                                                                               monkeypatch):
    """`--compile full` with the U-Net in channels_last and its GroupNorms from per-channel statistics (train/
    fast.py's layout lever for `full`, on) trains as the eager step does: the same losses up to the compiled
    kernels' rounding."""
    from ldm_cli.train import fast
    from ldm_cli.train.config import TrainConfig
    from ldm_cli.train.loop import train

    monkeypatch.setitem(fast.CHANNELS_LAST, "full", True)  # as shipped; set here so the test stays if that changes
    monkeypatch.setattr(fast, "GROUPNORM_BY_CHANNEL", True)
    base = dict(data_dir=str(shapes), model=str(tiny_model), max_steps=8, batch_size=4, lr=1e-3, seed=3,
                device="cuda", cache_dir=str(tmp_path / "cache"), mixed_precision="bf16")
    runs = {}
    for mode in ("none", "full"):
        train(TrainConfig(out_dir=str(tmp_path / mode), compile=mode, **base))
        runs[mode] = torch.tensor(test_folders.losses(tmp_path / mode))
    assert len(runs["none"]) == len(runs["full"]) == 8
    assert torch.allclose(runs["full"], runs["none"], rtol=1e-2, atol=1e-3), (runs["full"] - runs["none"]).abs().max()


def test_compile_auto_compiles_a_short_run_after_a_run_of_the_same_step(shapes, tiny_model, tmp_path, monkeypatch):
    """`--compile auto` on 200 steps is eager the first time; once a graphed run of the same step has noted its
    compile in inductor's cache folder, the same 200 steps are graphed, said so, and train as before."""
    from ldm_cli.train.config import TrainConfig
    from ldm_cli.train.fast import WARM_COMPILE_MIN_STEPS
    from ldm_cli.train.loop import train

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    base = dict(data_dir=str(shapes), model=str(tiny_model), batch_size=2, lr=1e-4, seed=2, device="cuda",
                cache_dir=str(tmp_path / "cache"), max_steps=WARM_COMPILE_MIN_STEPS, log_every=50)
    said = {}
    for run, mode in (("cold", "auto"), ("compiled", "graphs"), ("warm", "auto")):
        notes = []
        train(TrainConfig(out_dir=str(tmp_path / run), compile=mode, **base), say=notes.append)
        said[run] = [n for n in notes if n.startswith("--compile auto")]
    assert said["cold"][0].startswith("--compile auto: none for 200 steps (fewer than 2000")
    assert said["warm"][0].startswith("--compile auto: graphs for 200 steps (this step was compiled on this machine")
    assert len(list((tmp_path / "inductor" / "ldm-compiled").iterdir())) == 1
    cold, warm = (torch.tensor(test_folders.losses(tmp_path / run)) for run in ("cold", "warm"))
    assert len(cold) == len(warm) == WARM_COMPILE_MIN_STEPS
    assert torch.allclose(warm[:20], cold[:20], rtol=1e-3, atol=1e-4), (warm - cold)[:20].abs().max()  # as graphs
