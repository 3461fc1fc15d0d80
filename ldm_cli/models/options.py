"""`LoadOptions` (how to load a model): no torch, no diffusers, so that the CLI declares its options and
answers --help and bad input without importing them."""

from dataclasses import dataclass

from ldm_cli.errors import check
from ldm_cli.options import check_ranges, option

DTYPE_NAMES = ("fp32", "fp16", "bf16")
ACCEL_MODES = ("auto", "none", "graphs", "compile")
VAE_TILING = ("auto", "on", "off")


@dataclass(frozen=True)
class LoadOptions:
    """Which model, where it runs, and what is applied to it at load time."""
    model: str | None = option(None, "Diffusers folder, .safetensors file or hub id.", short="-m")
    config: str | None = option(None, "Single-file checkpoint: folder or hub id with the configs.")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps.")
    dtype: str = option("auto", "auto (fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16.",
                        choices=("auto", *DTYPE_NAMES))
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
