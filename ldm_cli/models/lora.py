"""LoRA (Hu et al. 2021): W' = W + scale * (alpha / r) * B A on the U-Net's attention projections.

Training adds adapters with peft (`add_lora`) and writes diffusers' LoRA file format (`save_lora`), which
`StableDiffusionPipeline.load_lora_weights` reads. Sampling (`apply_lora`) loads a file through that
same diffusers loader (so kohya-format files work too) and fuses it into the weights: the sampler and
CUDA graphs then see a plain model, and there is no per-step adapter cost.
"""

import functools
from pathlib import Path

from ldm_cli.errors import LdmError, check
from ldm_cli.models import runs

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]  # what diffusers' own LoRA training script adapts
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def add_lora(unet, rank: int, alpha: float | None = None) -> None:
    """Freeze the U-Net and give its attention projections trainable rank-`rank` adapters."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                target_modules=TARGET_MODULES))


def save_lora(unet, out_dir: Path, sdxl: bool = False) -> Path:
    """Write the adapters as out_dir/pytorch_lora_weights.safetensors (diffusers' format, read by
    StableDiffusion(XL)Pipeline.load_lora_weights)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    cls.save_lora_weights(out_dir, unet_lora_layers=layers, safe_serialization=True)
    return out_dir / WEIGHT_NAME


def loader_pipeline(c):
    """A diffusers pipeline over c's own modules, for its loaders (LoRA, textual inversion): the one of c's
    family, whose loaders know its keys (SDXL's read both text encoders', and kohya's SDXL names)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    if c.family == "sd":
        return StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                       scheduler=None, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    cls = StableDiffusionXLPipeline if c.family == "sdxl" else StableDiffusionXLImg2ImgPipeline
    return cls(vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2, tokenizer=c.tokenizer,
               tokenizer_2=c.tokenizer_2, unet=c.unet, scheduler=None)


def lora_file(path: str, allow_unsafe_pickle: bool = False) -> Path:
    """The weights file of a --lora argument (a file, a folder holding pytorch_lora_weights.*, or an `ldm train`
    run whose lora/ holds it), checked."""
    p = runs.product(Path(path), "lora")
    if p.is_dir():
        found = [p / n for n in (WEIGHT_NAME, "pytorch_lora_weights.bin") if (p / n).is_file()]
        check(found != [], f"--lora {path}: no {WEIGHT_NAME} in this folder")
        p = found[0]
    check(p.is_file(), f"--lora {path}: file not found")
    check(p.stat().st_size > 0, f"--lora {path}: the file is empty")
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                count = len(list(f.keys()))
        except Exception as e:  # noqa: BLE001 (safetensors raises its own types for damaged files)
            raise LdmError(f"--lora {path}: not a valid .safetensors file ({str(e).splitlines()[0][:160]})") from None
        check(count > 0, f"--lora {path}: the file holds no tensors")
    check(p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"),
          f"--lora {path}: not a weights file (expected .safetensors, or with --allow-unsafe-pickle .bin/.pt)")
    check(p.suffix == ".safetensors" or allow_unsafe_pickle,
          f"--lora {path}: pickle weights can run code when loaded; use a .safetensors file or pass "
          "--allow-unsafe-pickle if you trust it")
    return p


def parse_spec(spec: str, default_scale: float) -> tuple[str, float]:
    """'FILE' or 'FILE:SCALE' -> (FILE, scale); a path's own colons stay (only a numeric tail is a scale)."""
    head, sep, tail = spec.rpartition(":")
    try:
        scale = float(tail) if sep and head else None
    except ValueError:
        scale = None
    if scale is None:
        return spec, default_scale
    check(scale == scale and -10 <= scale <= 10, f"--lora {spec}: the scale must be in [-10, 10]")
    return head, scale


def file_hash(path: Path) -> str:
    """What PNGs record of a LoRA or embedding file: the first 10 hex digits of its sha256 (Civitai's
    "AutoV2"); computed once per file version in a process (checking a PNG and recording both ask)."""
    st = Path(path).stat()
    return _sha256_10(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_10(path: str, size: int, mtime_ns: int) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:10]


SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


def find_in_dir(name: str, lora_dir: str | None, tag: str) -> Path:
    """The file of a <lora:NAME> tag: NAME.safetensors (or .pt/.ckpt/.bin) in lora_dir or below, as A1111
    finds it by file name."""
    check(lora_dir is not None, f"the prompt names {tag}: give --lora-dir DIR, the folder of your LoRA files")
    root = Path(lora_dir)
    check(root.is_dir(), f"--lora-dir {lora_dir}: not a folder")
    found = sorted(p for p in root.rglob("*") if p.suffix.lower() in SUFFIXES and p.stem == name and p.is_file())
    check(found != [], f"the prompt names {tag}: no {name}.safetensors in --lora-dir {lora_dir}")
    check(len(found) == 1, f"the prompt names {tag}: several files are called {name} in --lora-dir {lora_dir} "
          f"({', '.join(str(p) for p in found[:3])}); rename one")
    return found[0]


def prompt_loras(prompts: list[str], lora_dir: str | None) -> tuple:
    """The LoRAs the prompts' <lora:NAME:WEIGHT> tags name, as (file, name, weight). One run fuses one
    set into the model, so every prompt of it must name the same set."""
    from ldm_cli.text.networks import split_networks

    sets = {p: tuple(split_networks(p)[1]) for p in prompts}
    distinct = sorted(set(sets.values()))
    check(len(distinct) <= 1, "prompts of one run name different <lora:...> sets ("
          + " vs ".join(", ".join(f"<lora:{n}:{w:g}>" for n, w in s) or "none" for s in distinct[:2])
          + "); one run fuses one set into the model: run them separately")
    tags = distinct[0] if distinct else ()
    return tuple((str(find_in_dir(n, lora_dir, f"<lora:{n}:{w:g}>")), n, w) for n, w in tags)


def apply_lora(c, path: str, scale: float = 1.0, allow_unsafe_pickle: bool = False) -> None:
    """Fuse the LoRA at `path` into c's networks."""
    apply_loras(c, [(path, scale)], allow_unsafe_pickle)


def apply_loras(c, loras: list[tuple[str, float]], allow_unsafe_pickle: bool = False) -> None:
    """Fuse LoRAs (path, scale) into c's networks: W' = W + sum_i scale_i (alpha_i / r_i) B_i A_i, as
    diffusers' set_adapters with those weights computes it unfused."""
    files = [lora_file(path, allow_unsafe_pickle) for path, _ in loras]
    pipe = loader_pipeline(c)
    names = [f"ldm{i}" for i in range(len(loras))]
    for (path, _), p, name in zip(loras, files, names):
        try:
            pipe.load_lora_weights(str(p.parent), weight_name=p.name, adapter_name=name)
        except (ValueError, KeyError, OSError, RuntimeError) as e:
            raise LdmError(f"--lora {path}: not a LoRA for this model ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        check(any(getattr(m, "peft_config", None) for m in (c.unet, c.text_encoder, c.text_encoder_2)),
              f"--lora {path}: none of its tensors fit this model's layers")
    if len(loras) == 1:
        pipe.fuse_lora(lora_scale=loras[0][1], adapter_names=names)
    else:
        pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
        pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()  # drops the adapter modules; the fused weights stay
