"""Loading models into `Components`, and the encode/decode helpers around the U-Net.

Sources, tried in this order by `load_components(model)`:
  - a diffusers folder (has model_index.json): each component by its own class's from_pretrained;
  - a single file `.safetensors` (original SD layout): diffusers' from_single_file, with `config=`
    naming a diffusers folder or hub id for the component configs when the file alone is not enough;
  - a hub id `org/name`: resolved to a snapshot in the local HF cache (downloaded when online;
    HF_HUB_OFFLINE=1 uses the cache only), then loaded as a folder.
Pickle formats (.ckpt/.pt/.bin/.pth) can run code on load: refused unless allow_unsafe_pickle.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm_cli.errors import RUNTIME, LdmError, check
from ldm_cli.schedule import Schedule, schedule_from_config

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HUB_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"]
HUB_IGNORE = ["*.fp16.*", "*non_ema*", "safety_checker/*", "feature_extractor/*"]


@dataclass
class Components:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    schedule: Schedule
    name: str  # what the user passed, recorded in PNG metadata
    device: torch.device
    dtype: torch.dtype
    unet_runner: object = None  # a faster stand-in for unet_fn's call (accel.py: CUDA graphs), or None
    lora: str = ""  # LoRA fused into the weights, "file@scale" (recorded in PNGs), or ""
    vae_tiling: str = "auto"  # "on", "off", or "auto": tiles only above TILE_ABOVE_PIXELS

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


def _quiet_libraries() -> None:
    """diffusers/transformers print progress bars and advice on every load; ldm has its own output."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def load_components(model: str, device: str = "auto", dtype: str = "auto", allow_unsafe_pickle: bool = False,
                    config: str | None = None) -> Components:
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    _quiet_libraries()
    path = Path(model).expanduser()
    if path.is_dir():
        parts = _load_folder(path, allow_unsafe_pickle, dt, dev)
    elif path.is_file():
        parts = _load_single_file(path, allow_unsafe_pickle, config)
    elif _looks_like_hub_id(model):
        parts = _load_folder(_hub_snapshot(model), allow_unsafe_pickle, dt, dev)
    else:
        raise LdmError(f"model {model!r} not found: give a diffusers folder, a .safetensors file or a hub id")
    unet, vae, text_encoder, tokenizer, scheduler_config = parts
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False).eval().to(dev, dt)
    return Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                      scheduler_config=scheduler_config, schedule=schedule_from_config(scheduler_config),
                      name=model, device=dev, dtype=dt)


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~")) and "\\" not in model


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, ignore_patterns=HUB_IGNORE))
    except Exception as e:  # offline with nothing cached, no such repo, gated repo...
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        raise LdmError(f"model {repo_id!r}: could not get it from the Hugging Face hub{hint}: "
                       f"{type(e).__name__}") from e


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LdmError(f"{path}: unreadable or not JSON ({type(e).__name__}); the model folder is damaged") from e


def _load_folder(path: Path, allow_unsafe_pickle: bool, dtype: torch.dtype = torch.float32,
                 device: torch.device = torch.device("cpu")):
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    check((path / "model_index.json").is_file(),
          f"{path}: not a diffusers model folder (no model_index.json)")
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        check((path / sub).is_dir(), f"{path}: model folder has no {sub}/ component")
    if not allow_unsafe_pickle:
        for sub in ("unet", "vae", "text_encoder"):
            has_safe = any((path / sub).glob("*.safetensors"))
            check(has_safe or not any(p.suffix in PICKLE_SUFFIXES for p in (path / sub).iterdir()),
                  f"{path / sub}: weights are pickle files only, which can run code when loaded; "
                  "convert them to .safetensors or pass --allow-unsafe-pickle if you trust them")
    scheduler_config = _read_json(path / "scheduler" / "scheduler_config.json")
    vae_class = _read_json(path / "vae" / "config.json").get("_class_name", "AutoencoderKL")
    vae_cls = AutoencoderTiny if vae_class == "AutoencoderTiny" else AutoencoderKL
    safe = True if not allow_unsafe_pickle else None  # None: safetensors where present, else pickle
    kw = dict(use_safetensors=safe, torch_dtype=dtype)  # load in the target dtype: no fp32 round trip
    if device.type == "cuda":
        kw["device_map"] = str(device)  # safetensors straight to the GPU, no staging copy in CPU memory
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        vae = vae_cls.from_pretrained(path, subfolder="vae", **kw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise LdmError(f"{path}: could not load the model: {_one_line(e)}") from e
    return unet, vae, text_encoder, tokenizer, scheduler_config


def _load_single_file(path: Path, allow_unsafe_pickle: bool, config: str | None):
    from diffusers import StableDiffusionPipeline

    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        check(allow_unsafe_pickle, f"{path}: {suffix} files are pickles, which can run code when loaded; "
              "use a .safetensors file or pass --allow-unsafe-pickle if you trust it")
    else:
        check(suffix == ".safetensors", f"{path}: not a model file (expected .safetensors or a folder)")
        _check_safetensors_header(path)
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=config, safety_checker=None, requires_safety_checker=False)
    except Exception as e:  # diffusers raises many types here; the message is what matters
        hint = "" if config else " (--config DIR_OR_HUB_ID gives the component configs)"
        raise LdmError(f"{path}: could not load as a Stable Diffusion checkpoint{hint}: {_one_line(e)}") from e
    return pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, dict(pipe.scheduler.config)


def _check_safetensors_header(path: Path) -> None:
    """Fail early, with the file's name, on a truncated or non-safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:
        raise LdmError(f"{path}: not a valid .safetensors file ({_one_line(e)})") from e


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def save_components(c: Components, out: Path) -> None:
    """Write a diffusers folder that StableDiffusionPipeline.from_pretrained and ldm both load."""
    from diffusers import DDIMScheduler

    c.unet.save_pretrained(out / "unet")
    c.vae.save_pretrained(out / "vae")
    c.text_encoder.save_pretrained(out / "text_encoder")
    c.tokenizer.save_pretrained(out / "tokenizer")
    DDIMScheduler.from_config(c.scheduler_config).save_pretrained(out / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": _diffusers_version(),
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", type(c.vae).__name__],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
             "feature_extractor": [None, None], "requires_safety_checker": False}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


# ---- encode / decode around the U-Net -------------------------------------------------------------

@torch.no_grad()
def encode_text(c: Components, prompts: list[str]) -> torch.Tensor:
    """CLIP hidden states [B, 77, D] for prompts, padded to the tokenizer's max length (as SD was trained)."""
    if c.batch_invariant and len(prompts) > 1:
        return torch.cat([encode_text(c, [p]) for p in prompts])
    tok = c.tokenizer(prompts, padding="max_length", max_length=c.tokenizer.model_max_length,
                      truncation=True, return_tensors="pt")
    mask = tok.attention_mask.to(c.device) if getattr(c.text_encoder.config, "use_attention_mask", False) else None
    return c.text_encoder(tok.input_ids.to(c.device), attention_mask=mask)[0].to(c.dtype)


def unet_fn(c: Components):
    """The U-Net as `f(x, t, context) -> output`, the signature sampling.guided expects: `context` may
    hold k contexts per latent (guidance: [uncond; cond]), see `call_unet`."""

    if c.unet_runner is not None:
        return c.unet_runner

    def f(x, t, context):
        if not c.batch_invariant:
            return call_unet(c.unet, x, t, context)
        pairs = len(context) // len(x)  # one latent (and its k contexts) per call, whatever the batch
        outs = [call_unet(c.unet, x[i:i + 1], t, context[i::len(x)]) for i in range(len(x))]
        return torch.cat([out[j:j + 1] for j in range(pairs) for out in outs])

    return f


def call_unet(unet, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The U-Net's output for latents `x` under `context`, whose batch is k times x's: each latent is
    evaluated under k contexts, as the batch [x; x; ...] (k = 2 for guidance's [uncond; cond]).
    With k == 2 the first self-attention runs once for both halves (SharedHalvesAttention)."""
    repeats = len(context) // len(x)
    if repeats * len(x) != len(context):
        raise ValueError(f"context batch {len(context)} is not a multiple of the latent batch {len(x)}")
    if repeats > 1:
        x = x.repeat(repeats, *[1] * (x.dim() - 1))
        t = t.repeat(repeats) if t.dim() else t
    shared = first_self_attention(unet) if repeats == 2 else None
    if shared is None:
        return unet(x, t, encoder_hidden_states=context, return_dict=False)[0]
    shared.halves_equal = True
    try:
        return unet(x, t, encoder_hidden_states=context, return_dict=False)[0]
    finally:
        shared.halves_equal = False


class SharedHalvesAttention:
    """Attention processor for the U-Net's first self-attention. With `halves_equal` set, it attends
    over the first half of the batch only and returns that result for both halves.

    Why: under classifier-free guidance each latent goes through the U-Net twice, under the
    unconditional and the conditional context. Nothing before the first cross-attention reads the
    context, so the two halves of the batch are still equal at the first self-attention, the costliest
    layer before that point (SD-1.5 at 512 px: 4096 tokens, ~1.2 of a 34 ms batch-16 call on an H100)."""

    def __init__(self, inner):
        self.inner = inner
        self.halves_equal = False

    def __call__(self, attn, hidden_states, *args, **kwargs):
        if not self.halves_equal:
            return self.inner(attn, hidden_states, *args, **kwargs)
        half = self.inner(attn, hidden_states[:len(hidden_states) // 2], *args, **kwargs)
        return torch.cat([half, half])


def first_self_attention(unet) -> SharedHalvesAttention | None:
    """The first self-attention's processor, wrapped in SharedHalvesAttention (once: it is looked up
    again on each call, since diffusers' fuse_qkv_projections replaces processors). None where the
    halves could already differ there: the context also enters through a class or addition embedding,
    or the first transformer block is not the plain (LayerNorm, self-then-cross attention) kind."""
    from diffusers.models.attention import BasicTransformerBlock

    config = unet.config
    if getattr(config, "class_embed_type", None) or getattr(config, "addition_embed_type", None):
        return None
    blocks = [b.attentions[0] for b in getattr(unet, "down_blocks", []) if getattr(b, "attentions", None)]
    block = getattr(blocks[0], "transformer_blocks", [None])[0] if blocks else None
    if (not isinstance(block, BasicTransformerBlock) or block.only_cross_attention or block.norm_type != "layer_norm"
            or block.attn1.is_cross_attention):
        return None
    if not isinstance(block.attn1.processor, SharedHalvesAttention):
        block.attn1.set_processor(SharedHalvesAttention(block.attn1.processor))
    return block.attn1.processor


@torch.no_grad()
def encode_image(c: Components, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Pixels in [-1, 1], [1, 3, H, W] -> latent, drawn from the VAE posterior with `generator`."""
    pixels = pixels.to(c.device, c.dtype)
    use_vae_tiling(c, *pixels.shape[-2:])
    out = c.vae.encode(pixels)
    # AutoencoderKL gives a posterior to sample; AutoencoderTiny gives the latent itself.
    latent = out.latent_dist.sample(generator) if hasattr(out, "latent_dist") else out.latents
    return latent * c.vae.config.scaling_factor


TILE_ABOVE_PIXELS = 1024 * 1024
VAE_TILING = ("auto", "on", "off")


def use_vae_tiling(c: Components, height: int, width: int) -> None:
    """Switch diffusers' tiled VAE encode/decode on or off for an image of this size. Tiles (512 px for
    SD, overlapping by 1/4 and blended) bound the decoder's activation memory, which otherwise grows
    with the image area (the 128-channel full-resolution maps are the largest tensors of sampling);
    the blended seams differ slightly from an untiled decode, so small images are not tiled."""
    if hasattr(c.vae, "use_tiling"):
        c.vae.use_tiling = c.vae_tiling == "on" or (c.vae_tiling == "auto" and height * width > TILE_ABOVE_PIXELS)


@torch.no_grad()
def decode_latents(c: Components, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1], float32 [B, 3, H, W]."""
    if c.batch_invariant and len(latents) > 1:
        return torch.cat([decode_latents(c, x[None]) for x in latents])
    use_vae_tiling(c, latents.shape[-2] * c.vae_scale, latents.shape[-1] * c.vae_scale)
    image = c.vae.decode(latents / c.vae.config.scaling_factor, return_dict=False)[0]
    return (image / 2 + 0.5).clamp(0, 1).float()


def oom_error(batch_size: int) -> LdmError:
    return LdmError(f"out of memory at batch size {batch_size}: try --batch-size 1, a smaller --width/--height "
                    "or --dtype fp16", RUNTIME)
