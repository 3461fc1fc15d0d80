"""Put the recipe's parts together as a diffusers Stable Diffusion folder.

    python assemble.py base VAE_DIR CLIP_DIR TOKENIZER_DIR OUT      # U-Net placeholder, for `ldm train --model`
    python assemble.py final TRAINED_MODEL_DIR CLIP_DIR OUT         # fp16 copy to ship, with the image tower
    python assemble.py half EMA.safetensors OUT.safetensors         # a checkpoint's U-Net EMA in fp16 (half the bytes)
    python assemble.py from-ema EMA.safetensors MODEL_DIR OUT        # MODEL_DIR with its U-Net's weights from a
                                                                    # checkpoint's EMA (a run cut before `final`;
                                                                    # MODEL_DIR/unet may hold its config only)

The scheduler is SD's DDIM setting (scaled-linear betas 0.00085..0.012, 1000 steps, epsilon). `final` and
`from-ema` give the folder its sampling defaults (ldm_defaults.json: cfg 5, where this family composes best): the
model's it went on from when it has one, else the shipped embedded model's.
"""

import json
import shutil
import sys
from pathlib import Path

import torch

SHIPPED_DEFAULTS = Path(__file__).parents[2] / "ldm_cli" / "embedded" / "ldm_defaults.json"
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def base(vae_dir: Path, clip_dir: Path, tok_dir: Path, out: Path) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    text = CLIPTextModel.from_pretrained(clip_dir / "text_encoder")
    config = {k: v for k, v in json.loads((Path(__file__).parent / "unet.json").read_text()).items()}
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4,
                                cross_attention_dim=text.config.hidden_size, **config)
    pipe = StableDiffusionPipeline(vae=AutoencoderKL.from_pretrained(vae_dir), text_encoder=text,
                                   tokenizer=CLIPTokenizer.from_pretrained(tok_dir), unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)


def final(trained: Path, clip_dir: Path, out: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    pipe = StableDiffusionPipeline.from_pretrained(trained, safety_checker=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    src = clip_dir / "image_encoder" if (clip_dir / "image_encoder").is_dir() else clip_dir  # or a shipped tower
    tower = CLIPVisionModelWithProjection.from_pretrained(src).to(torch.float16)
    tower.save_pretrained(out / "clip_image_tower")
    shutil.copy(src / "text_projection.safetensors", out / "clip_image_tower")
    with_defaults(out, trained)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {size / 1e6:.1f} MB")


def half(ema: Path, out: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_file({k: v.half() for k, v in load_file(ema).items()}, out)


def from_ema(ema: Path, model: Path, out: Path) -> None:
    """The fp16 model folder `final` would have made, from the last checkpoint's EMA weights (ldm's
    checkpoints name them as the U-Net's parameters) put into the model the run went on from, or into a run's
    base model whose U-Net folder holds its config only (gpu_call.sh returns the base so, without those weights)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    given = {}
    if not any(f.suffix in (".safetensors", ".bin") for f in (model / "unet").iterdir()):
        given["unet"] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model / "unet"))
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False, **given)
    weights = load_file(ema)
    params = dict(pipe.unet.named_parameters())
    if set(weights) != set(params):
        sys.exit(f"{ema}: not the EMA of {model}/unet's parameters ({len(weights)} tensors, {len(params)} parameters)")
    pipe.unet.load_state_dict(weights, strict=False)
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    if (model / "clip_image_tower").is_dir():
        shutil.copytree(model / "clip_image_tower", out / "clip_image_tower", dirs_exist_ok=True)
    with_defaults(out, model)


def with_defaults(out: Path, model: Path) -> None:
    """`out`'s ldm_defaults.json: `model`'s own, else the shipped embedded model's (a rebuilt model keeps cfg 5);
    where neither is there (a tree sent without ldm_cli/embedded), the folder is made without, and says so."""
    src = next((f for f in (model / SHIPPED_DEFAULTS.name, SHIPPED_DEFAULTS) if f.is_file()), None)
    if src is None:
        print(f"{out}: no {SHIPPED_DEFAULTS.name} to copy (add the shipped one's before sampling with it)")
        return
    shutil.copy(src, out / SHIPPED_DEFAULTS.name)


if __name__ == "__main__":
    what, *paths = sys.argv[1:]
    {"base": base, "final": final, "half": half, "from-ema": from_ema}[what](*map(Path, paths))
