"""What the benchmark scripts share: SD-1.5-shaped random models (speed does not depend on weight
values), timing, and reporting (one JSON line per result, a markdown table, a .jsonl file).

Results go to `--out DIR` (default `bench/results/<gpu>/`, e.g. `bench/results/h200/`), one file per
script named by what it measures: sample_speed.jsonl, first_image.jsonl, train_speed.jsonl, ...
"""

import json
import re
import sys
import time
from pathlib import Path

BENCH = Path(__file__).parent
sys.path.insert(0, str(BENCH.parent / "tests"))  # tests/tiny.py: the offline tokenizer writer

PEAK_TFLOPS = 989.0  # dense bf16/fp16 tensor-core peak of an H100 SXM / H200: the MFU denominator
SCHED = dict(_class_name="DDIMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             clip_sample=False, set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)


def gpu_slug() -> str:
    """'NVIDIA H200' -> 'h200'; 'cpu' without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower().replace("nvidia", "")
    found = re.search(r"[a-z]+\d+[a-z]*", name)
    return found.group(0) if found else re.sub(r"\W+", "-", name).strip("-")


def add_out_option(ap) -> None:
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for the results (default: bench/results/<gpu>/)")


def out_folder(out: Path | None) -> Path:
    folder = out or BENCH / "results" / gpu_slug()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Report:
    """Result rows: printed as JSON lines as they come (a run cut short keeps its log), then a table, and
    appended to <out>/<name>.jsonl with the command line and machine in a header row."""

    def __init__(self, folder: Path, name: str):
        import torch

        self.path = folder / f"{name}.jsonl"
        self.rows = []
        self.emit({"run": " ".join(sys.argv), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available()
                   else "cpu", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")})

    def emit(self, row: dict) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)

    def table(self, header, cells) -> None:
        """`cells(row)` gives a row's values, or None to leave the row out."""
        print("\n| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in self.rows:
            values = cells(r)
            if values is not None:
                print("| " + " | ".join(str(v) for v in values) + " |")

    def save(self) -> None:
        with open(self.path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.rows)
        print(f"\nwrote {self.path}")


def timed(fn, reps: int):
    """(median seconds of `reps` calls after one warm-up call, the last output)."""
    import torch

    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2], out


# kernel name fragments -> what the kernel does; the first match wins (convolutions before matmuls: cuDNN's
# Hopper convolutions are "sm90_xmma_fprop_implicit_gemm..." kernels)
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("convolution", ("fprop", "dgrad", "wgrad", "conv", "implicit_gemm", "winograd")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "triton_tem", "_mm_", "matmul")),
    ("norm / pointwise (fused)", ("triton_", "elementwise", "reduce", "norm", "vectorized")),
    ("copies", ("memcpy", "memset", "copy", "cat")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(p in low for p in parts)), "other")


def kernel_breakdown(fn, calls: int = 1) -> dict:
    """GPU time of one call of `fn` by kind of kernel (ms, and % of the GPU-busy time) plus the wall time
    and the GPU's idle share of it, from torch.profiler's CUDA kernel events over `calls` calls."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / calls * 1e3
    by_kind, unnamed = kernel_times(prof.events(), calls)
    busy = sum(by_kind.values())
    return {"wall_ms": round(wall, 1), "gpu_busy_ms": round(busy, 1), "idle_pct": round(100 * (1 - busy / wall), 1),
            **{f"{k}_ms": round(v, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            **{f"{k}_pct": round(100 * v / busy, 1) for k, v in by_kind.items()},
            "other_top": top_kernels(unnamed)}


def kernel_times(events, calls: int = 1) -> tuple[dict[str, float], dict[str, float]]:
    """({kind: ms}, {name: ms} of the kernels no kind claims: what "other" is made of) per call, from the
    profiler's CUDA events. A range named by record_function (e.g. "Optimizer.step#AdamW.step") shows on the
    GPU's timeline too, spanning the kernels it launched: a user annotation, not a kernel, so not counted (it
    was, once: AdamW's 9 ms counted twice, the GPU's idle time understated)."""
    import torch

    by_kind: dict[str, float] = {}
    unnamed: dict[str, float] = {}
    for e in events:
        if (e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0
                and not getattr(e, "is_user_annotation", False)):
            k, ms = kernel_kind(e.name), e.device_time_total / 1e3 / calls
            by_kind[k] = by_kind.get(k, 0.0) + ms
            if k == "other":
                unnamed[e.name] = unnamed.get(e.name, 0.0) + ms
    return by_kind, unnamed


def top_kernels(by_name: dict[str, float], n: int = 8) -> list:
    """The n largest of {kernel name: ms} as [name (cut to 100 characters), ms], largest first."""
    return [[name[:100], round(ms, 2)] for name, ms in sorted(by_name.items(), key=lambda kv: -kv[1])[:n]]


def sd15_unet(width: float = 1.0):
    """A random U-Net of Stable Diffusion 1.5's layout (blocks, layers, attention); `width` scales its channels
    and context (1: SD-1.5 itself; channels kept multiples of 32, GroupNorm's groups)."""
    from diffusers import UNet2DConditionModel

    channels = tuple(max(32, round(c * width / 32) * 32) for c in (320, 640, 1280, 1280))
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=channels, layers_per_block=2, cross_attention_dim=max(64, round(768 * width / 8) * 8),
        attention_head_dim=8)


def sd15_shaped(dev, dtype):
    """(unet, vae, text_encoder) shaped like Stable Diffusion 1.5's, random weights, eval, no grad."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = sd15_unet()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, vocab_size=49408,
                                        hidden_act="quick_gelu"))
    for m in (unet, vae, text):
        m.to(dev, dtype).eval().requires_grad_(False)
    return unet, vae, text


def components(unet, vae, text):
    """ldm's Components over these modules (no tokenizer: the scripts pass text embeddings)."""
    from ldm_cli.diffusion.schedule import schedule_from_config
    from ldm_cli.models.components import Components

    p = next(unet.parameters())
    return Components(unet=unet, vae=vae, text_encoder=text, tokenizer=None, scheduler_config=SCHED,
                      schedule=schedule_from_config(SCHED), name="sd15-shaped-random", device=p.device, dtype=p.dtype)


def save_sd15_random(folder: Path) -> Path:
    """An SD-1.5-shaped random model (fp16) saved as a diffusers folder, for timing the CLI itself."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from tiny import write_tokenizer

    if (folder / "model_index.json").is_file():
        return folder
    unet, vae, text = sd15_shaped("cpu", torch.float16)
    tok = write_tokenizer(folder.parent / (folder.name + "-tok"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler.from_config(SCHED), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def save_sdxl_random(folder: Path) -> Path:
    """An SDXL-base-shaped random model (fp16: U-Net 2.57B parameters, CLIP ViT-L and a bigG-shaped second
    encoder, the SDXL VAE) saved as a diffusers folder (about 7 GB), for timing the CLI itself. Built on the
    GPU when there is one (random init of 3.5B parameters on a CPU takes minutes)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from sdxl_speed import SCHED as SDXL_SCHED
    from sdxl_speed import sdxl_shaped
    from tiny import write_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if (folder / "model_index.json").is_file():
        return folder
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    unet, vae = sdxl_shaped(dev, torch.float16)
    tok = write_tokenizer(folder.parent / (folder.name + "-tok"))
    kw = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
              vocab_size=49408, max_position_embeddings=77)
    with torch.device(dev):
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, hidden_act="quick_gelu", **kw))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                            num_hidden_layers=32, num_attention_heads=20,
                                                            hidden_act="gelu", projection_dim=1280, **kw))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text.half(), text_encoder_2=text_2.half(), tokenizer=tok,
                                     tokenizer_2=tok, unet=unet, scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHED))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


if __name__ == "__main__":
    print(__doc__)
