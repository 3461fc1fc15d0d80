"""`Components` (a loaded model, frozen), with device/dtype rules. How to load one, `LoadOptions`, is in
`models.options` (torch-free, for the CLI)."""

from dataclasses import dataclass

import torch

from ldm_cli.diffusion.schedule import Schedule
from ldm_cli.errors import check
from ldm_cli.models.options import DTYPE_NAMES

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16)))


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
