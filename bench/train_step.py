"""Training step speed on one GPU, in one process: ldm's step beside a plain PyTorch loop.

    python bench/train_step.py --part speed        # batch 32: ldm's levers one by one, a step profile, plain compiled
    python bench/train_step.py --part more         # batch 8, fast-vs-plain losses
    python bench/train_step.py --part plain        # the plain loop eager and compiled at batch 32
    python bench/train_step.py --part memory --batch 32 --checkpointing   # one peak-memory row (own process)
    python bench/train_step.py --part memory --batch 32 --checkpointing selective [--compiled]
    python bench/train_step.py --part memory --batch 32 --optimizer adamw8bit   # with bitsandbytes installed
    python bench/train_step.py --part levers       # batch 32: compiled layout, cudnn.benchmark; losses; kernels
    python bench/train_step.py --part kernels      # batch 32: GPU time by kernel kind, ldm vs plain compiled
    python bench/train_step.py --part attention    # batch 32, eager: each SDPA backend's attention time
    python bench/train_step.py --part small        # the embedded model's U-Net at batch 256 (none, full, graphs), 1024

SD-1.5-shaped random U-Net (speed does not depend on values), 512px images = 64x64 latents, bf16.
- `plain`: a reference loop written here, nothing from ldm: data already on the GPU, autocast bf16,
  AdamW (fused), optionally `torch.compile(unet)`; the MSE epsilon loss.
- `ldm`: ldm's own step (`train.loop.train_step` over `train.batches.Batches` reading an in-memory latent
  cache, as `ldm train` runs it), its optimizer and the levers of `train/fast.py` (--compile none,
  regional, full).
images/s over --steps timed steps after --warmup steps (compilation happens in warm-up: `first_s` is the
time to the end of the first step). MFU = images/s x 2.40 TFLOP / 989 TFLOP/s (SD-1.5 U-Net forward at
64x64 latents ~0.80 TFLOP, training = 3x forward; the convention of bench/train_speed.py).
`--part small`: the embedded model's U-Net (recipes/tiny-emoji/unet.json, 64px images = 16x16 latents, 32
tokens of 256) at batch 256, the shape of the embedded recipe's run, whose step the host cannot keep fed:
ldm's step with --compile none, full and graphs (CUDA graphs), and full at batch 1024 (a host-bound step trains
~4x the images in the same time: the recipe's BATCH), beside the plain loop compiled by default and
with reduce-overhead (CUDA graphs); TFLOP per image counted by torch's FlopCounterMode (3x the forward).
"""

import argparse
import contextlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from common import PEAK_TFLOPS, Report, add_out_option, components, out_folder, sd15_shaped


@dataclass
class Shape:
    """The U-Net timed: its modules, latent side, text context [tokens, width], TFLOP a training image."""
    build: object  # () -> (unet, vae, text encoder) on the GPU
    latent: int
    context: tuple
    tflop_per_image: float
    resolution: int
    train_options: tuple = ()  # ldm's TrainConfig fields of the run it stands for


def small_shaped(dev, dtype):
    """(unet, vae, text_encoder) shaped like the embedded model's: the recipe's U-Net, a VAE of factor 4."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = json.loads((Path(__file__).parent.parent / "recipes/tiny-emoji/unet.json").read_text())
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, cross_attention_dim=256, **config)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 32, 32), layers_per_block=1,
                        sample_size=64)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=3,
                                        num_attention_heads=4, max_position_embeddings=32, vocab_size=49408))
    for m in (unet, vae, text):
        m.to(dev, dtype).eval().requires_grad_(False)
    return unet, vae, text


def training_tflop(unet, latent: int, context: tuple) -> float:
    """3x the forward's FLOPs of one image (backward ~2x forward), by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    dev = next(unet.parameters()).device
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(torch.zeros(1, 4, latent, latent, device=dev), torch.tensor([500], device=dev),
             torch.zeros(1, *context, device=dev))
    return 3 * counter.get_total_flops() / 1e12


SD15 = Shape(lambda: sd15_shaped("cuda", torch.float32), 64, (77, 768), 2.40, 512)
SHAPE = SD15  # what the runs time (main sets it)


def small_shape() -> Shape:
    unet, _, _ = small_shaped("cuda", torch.float32)
    return Shape(lambda: small_shaped("cuda", torch.float32), 16, (32, 256), training_tflop(unet, 16, (32, 256)), 64,
                 (("min_snr_gamma", 5.0), ("lr", 4e-4)))  # as recipes/tiny-emoji/run.sh trains it


def fresh_unet():
    unet, vae, text = SHAPE.build()
    unet.train().requires_grad_(True)
    return unet, vae, text


def plain_run(batch: int, compiled: bool, steps: int, warmup: int, mode: str | None = None) -> dict:
    name = f"plain {'compiled' if compiled else 'eager'}" + (f" {mode}" if mode else "")
    return timed_run(name, batch, plain_step(batch, compiled, mode), steps, warmup)


def plain_step(batch: int, compiled: bool, mode: str | None = None):
    """The reference loop's step: what a PyTorch user writes in a few lines (`mode`: torch.compile's)."""
    unet, _, _ = fresh_unet()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, weight_decay=1e-2, fused=True)
    model = torch.compile(unet, mode=mode) if compiled else unet
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, device="cuda") ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)
    g = torch.Generator("cuda").manual_seed(0)
    x0 = torch.randn(batch, 4, SHAPE.latent, SHAPE.latent, device="cuda", generator=g)
    ctx = torch.randn(batch, *SHAPE.context, device="cuda", generator=g)

    def step():
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,), device="cuda")
        a = alpha_bar[t].view(-1, 1, 1, 1)
        with torch.autocast("cuda", torch.bfloat16):
            pred = model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, ctx).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def ldm_setup(batch: int, compile_mode: str, seed: int = 0, lora: int = 0, checkpointing: str = "none",
              channels_last: bool | None = None, optimizer: str = "adamw"):
    """ldm's training objects as `train.loop.train` builds them, over an in-memory latent cache."""
    from accelerate import Accelerator

    from ldm_cli.train import fast, recompute
    from ldm_cli.train.batches import Batches, Encoders
    from ldm_cli.train.cache import EncodedData
    from ldm_cli.train.config import TrainConfig
    from ldm_cli.train.data import Example
    from ldm_cli.train.optim import build_optimizer, build_schedule

    unet, vae, text = fresh_unet()
    c = components(unet, vae, text)
    options = {"lr": 1e-5, **dict(SHAPE.train_options)}
    cfg = TrainConfig(data_dir="-", batch_size=batch, mixed_precision="bf16", seed=seed, resolution=SHAPE.resolution,
                      compile=compile_mode, optimizer=optimizer, **options)
    acc = Accelerator(mixed_precision="bf16")
    if lora:
        from ldm_cli.models.lora import add_lora

        add_lora(unet, lora)
    recompute.enable(unet, checkpointing == "all", checkpointing == "selective", compile_mode != "none")
    fast.speed_up(unet, compile_mode, acc.device, channels_last)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = build_optimizer(cfg, params)
    sched = build_schedule(cfg, opt, 10_000)
    model, opt = acc.prepare(unet, opt)
    rng = torch.Generator().manual_seed(seed)
    examples = [Example(Path(f"/data/{i}.png"), f"caption {i % 16}") for i in range(256)]
    n = SHAPE.latent
    cached = EncodedData({e.path: torch.randn(8, n, n, generator=rng) for e in examples},
                         {f"caption {k}": torch.randn(*SHAPE.context, generator=rng) for k in range(16)} |
                         {"": torch.randn(*SHAPE.context, generator=rng)}, 0, 0.0, [])
    batches = Batches(cfg, examples, Encoders(c, acc), cached, 1, 0)
    return cfg, model, c, batches, opt, sched, acc


def ldm_run(batch: int, compile_mode: str, steps: int, warmup: int, channels_last: bool | None = None) -> dict:
    layout = "" if channels_last is None else f" channels_last={channels_last}"
    return timed_run(f"ldm compile={compile_mode}{layout}", batch, ldm_step(batch, compile_mode, channels_last), steps,
                     warmup)


def ldm_step(batch: int, compile_mode: str, channels_last: bool | None = None):
    """ldm's training step as `ldm train` runs it, one call per step."""
    from ldm_cli.train import fast
    from ldm_cli.train.loop import train_step

    cfg, model, c, batches, opt, sched, acc = ldm_setup(batch, compile_mode, channels_last=channels_last)
    k = iter(range(10**9))

    def step():
        with fast.compile_limits():
            fast.step_begins(compile_mode)
            return train_step(cfg, model, model, c.schedule, (batches, None), opt, sched, acc, next(k))

    return step


def kernels(batch: int, compile_mode: str, channels_last: bool | None = None) -> list[dict]:
    """GPU time by kernel kind of one step, ldm's and the plain compiled loop's (after 3 steps of compiling)."""
    from common import kernel_breakdown

    rows = []
    layout = "" if channels_last is None else f" channels_last={channels_last}"
    for name, step in ((f"kernels ldm compile={compile_mode}{layout}",
                        lambda: ldm_step(batch, compile_mode, channels_last)),
                       ("kernels plain compiled", lambda: plain_step(batch, True))):
        fn = step()
        for _ in range(3):
            fn()
        rows.append({"run": name, "batch": batch, **kernel_breakdown(fn, calls=3)})
        del fn
        torch.cuda.empty_cache()
    return rows


def attention_backends(batch: int) -> list[dict]:
    """ldm's eager step with each SDPA backend pinned (the attention kernels are the same ones under compile:
    inductor calls them, it does not generate them): how much of attention's fifth of the step each gives."""
    from common import kernel_breakdown

    rows = []
    for name in ("default", "flash", "efficient", "cudnn"):
        with attention(name):
            try:
                fn = ldm_step(batch, "none")
                for _ in range(2):
                    fn()
                rows.append({"run": f"attention {name}", "batch": batch, **kernel_breakdown(fn, calls=3)})
            except RuntimeError as e:  # a backend that does not take these shapes says so
                rows.append({"run": f"attention {name}", "batch": batch, "unavailable": str(e).splitlines()[0][:200]})
            fn = None
            torch.cuda.empty_cache()
    return rows


LEVER_RUNS = {"ldm compile=full channels_last=True": lambda batch: ldm_step(batch, "full", True),
              "plain compiled": lambda batch: plain_step(batch, True),
              "ldm compile=none": lambda batch: ldm_step(batch, "none"),
              "ldm compile=full channels_last=False": lambda batch: ldm_step(batch, "full", False)}


def levers(batch: int, steps: int, warmup: int, names):
    """The compiled step's layout and cuDNN's autotuning, one lever at a time, beside the plain compiled loop:
    each step built (compiled) once and timed with torch.backends.cudnn.benchmark off, then on (a flag read at
    each convolution: no recompile; the second run's first step holds cuDNN's autotuning)."""
    import gc

    for name in names:
        step = LEVER_RUNS[name](batch)
        for tuned in (False, True):
            torch.backends.cudnn.benchmark = tuned
            yield timed_run(f"{name} cudnn.benchmark={tuned}", batch, step, steps, warmup)
        step = None
        gc.collect()
        torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = False


def timed_run(name: str, batch: int, step, steps: int, warmup: int) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    float(loss)
    dt = (time.perf_counter() - t1) / steps
    ips = batch / dt
    row = {"run": name, "batch": batch, "images_per_s": round(ips, 1),
           "mfu_pct": round(100 * ips * SHAPE.tflop_per_image / PEAK_TFLOPS, 1), "step_ms": round(1000 * dt, 1),
           "first_s": round(first, 1), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
    torch.cuda.empty_cache()
    return row


def losses_agree(batch: int, fast_mode: str, n: int = 20, channels_last: bool | None = None) -> dict:
    """The first n losses of the fast path (compiled) and the plain one (none), same seed."""
    from ldm_cli.train import fast
    from ldm_cli.train.loop import train_step

    out = {}
    for mode in ("none", fast_mode):
        cfg, model, c, batches, opt, sched, acc = ldm_setup(batch, mode, seed=7, channels_last=channels_last)
        t0 = time.perf_counter()
        with fast.compile_limits():
            out[mode] = []
            for k in range(n):
                fast.step_begins(mode)
                out[mode].append(float(train_step(cfg, model, model, c.schedule, (batches, None), opt, sched, acc,
                                                  k)))  # read now: a graph's next replay reuses its buffers
                if k == 0:
                    out[f"{mode}_first_s"] = round(time.perf_counter() - t0, 1)
        del model, opt
        torch.cuda.empty_cache()
    rel = [abs(a - b) / abs(a) for a, b in zip(out["none"], out[fast_mode])]
    return {"run": "losses fast vs plain", "batch": batch, "steps": n, "max_rel_diff": round(max(rel), 4),
            "mean_rel_diff": round(sum(rel) / n, 4), "plain": [round(x, 4) for x in out["none"]],
            "fast": [round(x, 4) for x in out[fast_mode]], "fast_mode": fast_mode,
            "fast_first_step_s_warm_cache": out[f"{fast_mode}_first_s"]}


def profile(batch: int, compile_mode: str, steps: int = 5) -> dict:
    """Where one ldm step's time goes: data, forward+loss, backward, optimizer (synchronised phases)."""
    from ldm_cli.train import fast
    from ldm_cli.train.loss import diffusion_loss

    cfg, model, c, batches, opt, sched, acc = ldm_setup(batch, compile_mode)
    phases = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}

    def mark(key, t):
        torch.cuda.synchronize()
        now = time.perf_counter()
        phases[key] += now - t
        return now

    for k in range(2 + steps):
        if k == 2:
            phases = dict.fromkeys(phases, 0.0)
        gen = torch.Generator().manual_seed(k)
        t = time.perf_counter()
        latents, context = batches.batch(k, 0, gen)
        t = mark("data", t)
        with fast.compile_limits(), acc.autocast():
            loss = diffusion_loss(model, c.schedule, latents, context, gen)
        t = mark("forward", t)
        acc.backward(loss)
        t = mark("backward", t)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        mark("optimizer", t)
    total = sum(phases.values())
    return {"run": f"profile ldm compile={compile_mode}", "batch": batch,
            **{f"{k}_ms": round(1000 * v / steps, 1) for k, v in phases.items()},
            **{f"{k}_pct": round(100 * v / total, 1) for k, v in phases.items()}}


def peak_memory(batch: int, checkpointing: str, lora: int, optimizer: str = "adamw", compile_mode: str = "none") -> dict:
    """Peak GPU memory of ldm's step (eager unless compile_mode): full fine-tune or LoRA, checkpointing none, all or
    selective, AdamW or 8-bit AdamW."""
    from ldm_cli.train import fast, recompute
    from ldm_cli.train.loop import train_step

    cfg, model, c, batches, opt, sched, acc = ldm_setup(batch, compile_mode, lora=lora, checkpointing=checkpointing,
                                                        optimizer=optimizer)
    budget = fast.compile_limits(recompute.compiled_budget(checkpointing == "selective"))  # as ldm's loop runs it
    torch.cuda.reset_peak_memory_stats()
    with budget if compile_mode != "none" else contextlib.nullcontext():
        loss = train_step(cfg, model, model, c.schedule, (batches, None), opt, sched, acc, 0)
        float(loss)
        t0 = time.perf_counter()
        for k in range(1, 6):
            loss = train_step(cfg, model, model, c.schedule, (batches, None), opt, sched, acc, k)
        float(loss)
    dt = (time.perf_counter() - t0) / 5
    row = {"run": "peak memory", "batch": batch, "what": f"LoRA r{lora}" if lora else "full fine-tune",
           "checkpointing": checkpointing, "optimizer": optimizer, "compile": compile_mode,
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
           "images_per_s" + ("_eager" if compile_mode == "none" else ""): round(batch / dt, 1)}
    del model, opt, c, batches
    torch.cuda.empty_cache()
    return row


def attention(name: str):
    """Every run's SDPA kernel pinned to one backend (a lever to time: head dim 40 at SD-1.5's first level)."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION}
    return nullcontext() if name == "default" else sdpa_kernel([backends[name]])


def run_part(args, report) -> None:
    global SHAPE

    def emit(row: dict) -> None:
        report.emit({**row, "sdpa": args.sdpa})

    if args.part == "small":
        SHAPE = small_shape()
        print(f"embedded-shaped U-Net: {SHAPE.tflop_per_image:.5f} TFLOP a training image")
        steps = max(args.steps, 60)  # ~0.1 s a step: more of them for a steady figure
        for mode in ("none", "full", "graphs"):  # ldm's first: the embedded recipe picks its --compile from them
            emit(ldm_run(256, mode, steps, args.warmup))
        emit(ldm_run(1024, "full", steps // 2, args.warmup))  # host-bound: ~4x the images for the step's time
        emit(losses_agree(256, "graphs"))
        for row in kernels(256, "full"):  # GPU time a step against the step's time: GPU- or host-bound?
            emit(row)
        emit(plain_run(256, True, steps, args.warmup))
        emit(plain_run(256, True, steps, args.warmup, mode="reduce-overhead"))
    elif args.part == "speed":
        emit(ldm_run(32, "none", args.steps, args.warmup, channels_last=False))
        emit(ldm_run(32, "none", args.steps, args.warmup, channels_last=True))
        emit(ldm_run(32, args.compile, args.steps, args.warmup))
        emit(profile(32, args.compile))
        emit(plain_run(32, True, args.steps, args.warmup))
    elif args.part == "levers":
        for row in levers(32, args.steps, args.warmup, list(LEVER_RUNS)[:3]):
            emit(row)
        emit(losses_agree(32, "full"))  # the compiled path as ldm now runs it, the plain (eager) one
        for row in kernels(32, "full"):
            emit(row)
        for row in levers(32, args.steps, args.warmup, list(LEVER_RUNS)[3:]):  # the layout before, last: a
            emit(row)  # third cold compile
    elif args.part == "memory":  # one row per process: nothing of an earlier run counts in its peak
        emit(peak_memory(args.batch, args.checkpointing, args.lora, args.optimizer,
                         args.compile if args.compiled else "none"))
    elif args.part == "kernels":
        for row in kernels(32, args.compile):
            emit(row)
    elif args.part == "attention":
        for row in attention_backends(32):
            emit(row)
    elif args.part == "plain":
        emit(plain_run(32, False, args.steps, args.warmup))
        emit(plain_run(32, True, args.steps, args.warmup))
    else:
        emit(ldm_run(8, args.compile, args.steps, args.warmup))
        emit(losses_agree(8, args.compile))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("speed", "more", "plain", "memory", "kernels", "attention", "small", "levers"),
                    default="speed")
    ap.add_argument("--batch", type=int, default=8, help="--part memory: batch size")
    ap.add_argument("--checkpointing", nargs="?", const="all", default="none", choices=("none", "all", "selective"),
                    help="--part memory: gradient checkpointing (alone: all; selective: train/recompute.py's)")
    ap.add_argument("--compiled", action="store_true", help="--part memory: the step compiled as --compile says")
    ap.add_argument("--lora", type=int, default=0, help="--part memory: LoRA rank (0: full fine-tune)")
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit"),
                    help="--part memory: adamw8bit needs bitsandbytes")
    ap.add_argument("--steps", type=int, default=15, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=4, help="steps before the timed span (compilation)")
    ap.add_argument("--compile", default="full", choices=("regional", "full", "graphs"),
                    help="ldm's compiled mode to time")
    ap.add_argument("--sdpa", default="default", choices=("default", "flash", "efficient", "cudnn"),
                    help="the attention kernel of every run (torch.nn.attention.sdpa_kernel); default: torch's choice")
    add_out_option(ap)
    args = ap.parse_args()
    random.seed(0)
    report = Report(out_folder(args.out), f"train_step_{args.part}")
    with attention(args.sdpa):
        run_part(args, report)
    report.table(("run", "batch", "images/s", "MFU", "step ms", "first step s", "peak GiB"),
                 lambda r: [r["run"], r["batch"], r["images_per_s"], f"{r['mfu_pct']}%", r["step_ms"], r["first_s"],
                            r["peak_gib"]] if "mfu_pct" in r else None)
    report.save()


if __name__ == "__main__":
    main()
