"""Loading models into `Components`, and saving them as diffusers folders.

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
from pathlib import Path

import torch

from ldm_cli.diffusion.schedule import schedule_from_config
from ldm_cli.errors import LdmError, check
from ldm_cli.models import runs
from ldm_cli.models.components import Components, resolve_device, resolve_dtype

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
HUB_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"]
HUB_IGNORE = ["*.fp16.*", "*non_ema*", "safety_checker/*", "feature_extractor/*"]


def load_components(model: str, device: str = "auto", dtype: str = "auto", allow_unsafe_pickle: bool = False,
                    config: str | None = None) -> Components:
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path = runs.product(Path(model).expanduser(), "model")  # an `ldm train` run: its model/
    if path.is_dir():
        parts = _load_folder(path, allow_unsafe_pickle, dt, dev)
    elif path.is_file():
        parts = _load_single_file(path, allow_unsafe_pickle, config)
    elif _looks_like_hub_id(model) and not path.parent.is_dir():
        parts = _load_folder(_hub_snapshot(model), allow_unsafe_pickle, dt, dev)
    else:
        where = "no such folder or file" if path.parent.is_dir() or model.startswith((".", "/", "~")) else "not found"
        raise LdmError(f"model {model!r}: {where}; give a diffusers folder, a .safetensors file or a hub id")
    _check_sane(parts, model)
    unet, vae = parts["unet"], parts["vae"]
    for m in (unet, vae, parts.get("text_encoder"), parts.get("text_encoder_2")):
        if m is not None:
            m.requires_grad_(False).eval().to(dev, dt)
    family = "sd" if parts.get("text_encoder_2") is None else "sdxl" if parts.get("text_encoder") else "sdxl-refiner"
    if family != "sd" and dt == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)  # SDXL's VAE overflows in fp16; diffusers upcasts it too (force_upcast)
    return Components(unet=unet, vae=vae, text_encoder=parts.get("text_encoder"), tokenizer=parts.get("tokenizer"),
                      scheduler_config=parts["scheduler_config"], schedule=schedule_from_config(parts["scheduler_config"]),
                      name=model, device=dev, dtype=dt, text_encoder_2=parts.get("text_encoder_2"),
                      tokenizer_2=parts.get("tokenizer_2"), family=family,
                      force_zeros_for_empty_prompt=bool(parts.get("force_zeros_for_empty_prompt", False)),
                      requires_aesthetics_score=bool(parts.get("requires_aesthetics_score", False)))


def _check_sane(parts: dict, model: str) -> None:
    """Configs a crafted or broken folder may carry, refused before they cost hours or all memory."""
    unet, vae = parts["unet"], parts["vae"]
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    side = getattr(unet.config, "sample_size", 0)
    side = max(side) if isinstance(side, (list, tuple)) else side
    check(isinstance(side, int) and 1 <= side * scale <= 8192,
          f"{model}: the U-Net's sample_size {side} (x{scale} pixels) is outside 1..8192 pixels; the config is damaged")
    for te, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        text_encoder, tokenizer = parts.get(te), parts.get(tok)
        if text_encoder is None:
            continue
        limit = getattr(tokenizer, "model_max_length", 0)
        positions = getattr(text_encoder.config, "max_position_embeddings", 77)
        check(isinstance(limit, int) and 1 <= limit <= positions,
              f"{model}: the {tok}'s model_max_length {limit} is outside 1..{positions} (the text encoder's "
              "positions); the tokenizer config is damaged")
        check(len(tokenizer) <= text_encoder.config.vocab_size, f"{model}: the {tok} has {len(tokenizer)} tokens, "
              f"its text encoder {text_encoder.config.vocab_size}: they do not belong together")
    for name, module in (("U-Net", unet), ("VAE", vae), ("text encoder", parts.get("text_encoder")),
                         ("second text encoder", parts.get("text_encoder_2"))):
        missing = [n for n, p in module.named_parameters() if p.is_meta] if module is not None else []
        check(not missing, f"{model}: the {name}'s weights lack {len(missing)} tensor(s) its config asks for "
              f"({missing[0] if missing else ''}...); the weights and config do not belong together")


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~")) and "\\" not in model


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, ignore_patterns=HUB_IGNORE))
    except Exception as e:  # offline with nothing cached, no such repo, gated repo...
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = ("no such local folder, and HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
               if offline else f"no such local folder, and the Hugging Face hub did not give it "
               f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})")
        raise LdmError(f"model {repo_id!r}: {why}") from e


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LdmError(f"{path}: unreadable or not JSON ({type(e).__name__}); the model folder is damaged") from e


def _load_folder(path: Path, allow_unsafe_pickle: bool, dtype: torch.dtype = torch.float32,
                 device: torch.device = torch.device("cpu")) -> dict:
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    check((path / "model_index.json").is_file(),
          f"{path}: not a diffusers model folder (no model_index.json)")
    index = _read_json(path / "model_index.json")
    sdxl = (path / "text_encoder_2").is_dir()  # the family from the files: SDXL has a second text encoder
    encoders = [("text_encoder", "tokenizer", CLIPTextModel)] if (path / "text_encoder").is_dir() or not sdxl else []
    encoders += [("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection)] if sdxl else []
    for sub in ("unet", "vae", "scheduler", *(name for pair in encoders for name in pair[:2])):
        check((path / sub).is_dir(), f"{path}: model folder has no {sub}/ component")
    if not allow_unsafe_pickle:
        for sub in ("unet", "vae", *(pair[0] for pair in encoders)):
            has_safe = any((path / sub).glob("*.safetensors"))
            check(has_safe or not any(p.suffix in PICKLE_SUFFIXES for p in (path / sub).iterdir()),
                  f"{path / sub}: weights are pickle files only, which can run code when loaded; "
                  "convert them to .safetensors or pass --allow-unsafe-pickle if you trust them")
    parts = {"scheduler_config": _read_json(path / "scheduler" / "scheduler_config.json"),
             "force_zeros_for_empty_prompt": index.get("force_zeros_for_empty_prompt", False) is True,
             "requires_aesthetics_score": index.get("requires_aesthetics_score", False) is True}
    vae_class = _read_json(path / "vae" / "config.json").get("_class_name", "AutoencoderKL")
    vae_cls = AutoencoderTiny if vae_class == "AutoencoderTiny" else AutoencoderKL
    safe = True if not allow_unsafe_pickle else None  # None: safetensors where present, else pickle
    kw = dict(use_safetensors=safe, torch_dtype=dtype)  # load in the target dtype: no fp32 round trip
    if device.type == "cuda":
        kw["device_map"] = str(device)  # safetensors straight to the GPU, no staging copy in CPU memory
    try:
        parts["unet"] = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        parts["vae"] = vae_cls.from_pretrained(path, subfolder="vae", **kw)
        for encoder, tokenizer, cls in encoders:
            parts[encoder] = cls.from_pretrained(path, subfolder=encoder, **kw)
            parts[tokenizer] = CLIPTokenizer.from_pretrained(path, subfolder=tokenizer)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise LdmError(f"{path}: could not load the model: {_one_line(e)}") from e
    return parts


def _load_single_file(path: Path, allow_unsafe_pickle: bool, config: str | None):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    suffix = path.suffix.lower()
    keys = ()
    if suffix in PICKLE_SUFFIXES:
        check(allow_unsafe_pickle, f"{path}: {suffix} files are pickles, which can run code when loaded; "
              "use a .safetensors file or pass --allow-unsafe-pickle if you trust it")
    else:
        check(suffix == ".safetensors", f"{path}: not a model file (expected .safetensors or a folder)")
        keys = _check_safetensors_header(path)
    # the family from the tensors' names (original SGM layout): SDXL's conditioner holds its text encoders,
    # the base two (embedders.0 CLIP-L, .1 bigG), the refiner one (embedders.0 bigG)
    sdxl = any(k.startswith("conditioner.embedders.") for k in keys)
    refiner = sdxl and not any(k.startswith("conditioner.embedders.1.") for k in keys)
    cls = (StableDiffusionXLImg2ImgPipeline if refiner else StableDiffusionXLPipeline) if sdxl else StableDiffusionPipeline
    kw = {} if sdxl else dict(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = cls.from_single_file(str(path), config=config, **kw)
    except Exception as e:  # diffusers raises many types here; the message is what matters
        hint = "" if config else " (--config DIR_OR_HUB_ID gives the component configs)"
        family = "an SDXL" if sdxl else "a Stable Diffusion"
        raise LdmError(f"{path}: could not load as {family} checkpoint{hint}: {_one_line(e)}") from e
    parts = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer,
             "scheduler_config": dict(pipe.scheduler.config)}
    if sdxl:
        parts.update(text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2,
                     force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", False)),
                     requires_aesthetics_score=bool(pipe.config.get("requires_aesthetics_score", False)))
    return parts


def _check_safetensors_header(path: Path) -> list[str]:
    """The tensor names; fails early, with the file's name, on a truncated or non-safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise LdmError(f"{path}: not a valid .safetensors file ({_one_line(e)})") from e


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def save_components(c: Components, out: Path) -> None:
    """Write a diffusers folder that StableDiffusion(XL)Pipeline.from_pretrained and ldm both load."""
    from diffusers import DDIMScheduler

    c.unet.save_pretrained(out / "unet")
    c.vae.save_pretrained(out / "vae")
    encoders = {"text_encoder": (c.text_encoder, c.tokenizer), "text_encoder_2": (c.text_encoder_2, c.tokenizer_2)}
    index = {"_class_name": "StableDiffusionXLPipeline" if c.family != "sd" else "StableDiffusionPipeline",
             "_diffusers_version": _diffusers_version(), "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", type(c.vae).__name__], "scheduler": ["diffusers", "DDIMScheduler"]}
    for name, (encoder, tokenizer) in encoders.items():
        if encoder is not None:
            encoder.save_pretrained(out / name)
            tokenizer.save_pretrained(out / name.replace("text_encoder", "tokenizer"))
        if encoder is not None or c.family != "sd":
            index[name] = ["transformers", type(encoder).__name__] if encoder is not None else [None, None]
            index[name.replace("text_encoder", "tokenizer")] = (["transformers", "CLIPTokenizer"]
                                                                if encoder is not None else [None, None])
    if c.family == "sd":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    else:
        index.update(force_zeros_for_empty_prompt=c.force_zeros_for_empty_prompt)
    DDIMScheduler.from_config(c.scheduler_config).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
