"""`Components` (a loaded model, frozen) and `LoadOptions` (how to load one), with device/dtype rules."""

from dataclasses import dataclass

import torch

from ldm_cli.diffusion.schedule import Schedule
from ldm_cli.errors import check
from ldm_cli.options import check_ranges, option

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ACCEL_MODES = ("auto", "none", "graphs", "compile")
VAE_TILING = ("auto", "on", "off")


@dataclass(frozen=True)
class LoadOptions:
    """Which model, where it runs, and what is applied to it at load time."""
    model: str | None = option(None, "Diffusers folder, .safetensors file or hub id.", short="-m")
    config: str | None = option(None, "Single-file checkpoint: folder or hub id with the configs.")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps.")
    dtype: str = option("auto", "auto (fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16.",
                        choices=("auto", *DTYPES))
    allow_unsafe_pickle: bool = option(False, "Allow .ckpt/.bin/.pt weights (pickle can run code).")
    accel: str = option("auto", "auto (CUDA graphs on CUDA), none, graphs, compile.", choices=ACCEL_MODES)
    lora: tuple[str, ...] = option((), "LoRA file or folder to apply (e.g. OUT/lora), FILE or FILE:SCALE; repeat "
                                   "for several.")
    # <lora:NAME:WEIGHT> in a prompt: NAME.safetensors looked up (by file name, in sub-folders too) here
    lora_dir: str | None = option(None, "Folder of LoRA files for <lora:NAME:WEIGHT> prompt tags.")
    # the prompts' <lora:...> tags resolved, (FILE, NAME, WEIGHT); filled in from the jobs, not a flag
    prompt_loras: tuple = option((), "", cli=False)
    embedding: tuple[str, ...] = option((), "Textual-inversion embedding, FILE or FILE:TOKEN (default token: the "
                                        "file's name); repeat for several.")
    lora_scale: float = option(1.0, "Scale of a --lora given without :SCALE (1: as trained; -10..10).", min=-10.0,
                               max=10.0, finite=True)
    vae_tiling: str = option("auto", "Tiled VAE decode/encode: auto (above 1024x1024 pixels), on, off.",
                             choices=VAE_TILING)


def validate(o: LoadOptions) -> None:
    check(o.model is None or o.model.strip() != "", "--model is empty: give a folder, a .safetensors file or a hub id")
    check_ranges(o)


@dataclass(frozen=True)
class Components:
    """A loaded model: its networks (weights are mutated only by LoRA fusing and accel's layout
    changes, in place, at load time), tokenizer, schedule, device and dtype. Frozen: loading sets
    everything once; `dataclasses.replace` makes a variant (training swaps the U-Net)."""
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    schedule: Schedule
    name: str  # what the user passed, recorded in PNG metadata
    device: torch.device
    dtype: torch.dtype
    embeddings: str = ""  # textual-inversion tokens loaded, "token@sha256[:10], ..." (recorded in PNGs)
    lora: str = ""  # --lora files fused into the weights, "file@scale#hash, ..." (recorded in PNGs), or ""
    lora_hashes: str = ""  # every LoRA fused (prompt tags too), "name: hash, ..." (A1111's "Lora hashes")
    vae_tiling: str = "auto"  # "on", "off", or "auto": tiles only above TILE_ABOVE_PIXELS
    # SDXL (detected from the files, never the name): a second text encoder, OpenCLIP bigG with projection;
    # the refiner has only that one (text_encoder and tokenizer None)
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object = None
    family: str = "sd"  # "sd" (1.x/2.x), "sdxl", "sdxl-refiner"
    force_zeros_for_empty_prompt: bool = False  # SDXL base: no negative prompt means zero embeddings
    requires_aesthetics_score: bool = False  # SDXL refiner: an aesthetic score in place of the target size

    @property
    def batch_invariant(self) -> bool:
        """On CPU, run networks one image at a time: BLAS and oneDNN pick kernels by batch size (gemv for
        one row, gemm for more), so a batched call can differ in the last bit from a single one. Batching
        buys little on a CPU; bitwise reproducibility across --batch-size is worth more there."""
        return self.device.type == "cpu"

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell: 2 ** (number of VAE down blocks - 1), 8 for SD."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    check(device in ("cpu", "cuda", "mps") or device.startswith("cuda:"),
          f"--device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    if device.startswith("cuda"):
        check(torch.cuda.is_available(), f"--device {device}: CUDA is not available here; use --device cpu")
    if device == "mps":
        check(torch.backends.mps.is_available(), "--device mps: MPS is not available here; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: fp16 on accelerators (what SD checkpoints are made for), fp32 on CPU (fp16 is slow there)."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    check(dtype in DTYPES, f"--dtype must be auto, fp32, fp16 or bf16, got {dtype!r}")
    return DTYPES[dtype]
