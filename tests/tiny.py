"""Tiny random-weight Stable-Diffusion-shaped models, built offline (no hub) for the tests."""

import json
from pathlib import Path

import torch

SPECIAL = ["<|startoftext|>", "<|endoftext|>"]


def bytes_to_unicode():
    """GPT-2/CLIP byte-level alphabet: 256 printable stand-ins for the 256 bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder: Path, max_length: int = 77):
    """A CLIP BPE tokenizer with the byte alphabet and a few merges: enough to tokenize any text."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = bytes_to_unicode()
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("r", "e"), ("re", "d</w>")]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + SPECIAL
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    return tok


def build_pipeline(prediction_type: str = "epsilon", seed: int = 0, tokenizer_dir: Path | None = None,
                   **scheduler_kw):
    """A diffusers StableDiffusionPipeline with tiny random weights (64x64 images, latents 4x32x32)."""
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=64)
    tokenizer = write_tokenizer(Path(tokenizer_dir or tempfile.mkdtemp()))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tokenizer), max_position_embeddings=77))
    with torch.no_grad():  # a trained encoder's last norm has a bias: its states do not average to 0 (emphasis
        text_encoder.final_layer_norm.bias.normal_(0, 0.5)  # restores that mean, which must not be ~0 here)
    sched = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    scheduler = DDIMScheduler(**{**sched, **scheduler_kw})
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_tiny(folder: Path, **kw) -> Path:
    pipe = build_pipeline(tokenizer_dir=folder.parent / (folder.name + "-tok"), **kw)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def guided_inputs(unet, batch: int):
    """Seeded U-Net inputs as guidance calls it: `batch` latents (16x16), a timestep, and 2 x batch
    contexts [uncond; cond] of 7 tokens."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, unet.config.in_channels, 16, 16, generator=g)
    context = torch.randn(2 * batch, 7, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor(10), context


def build_sdxl_pipeline(refiner: bool = False, seed: int = 0, tokenizer_dir: Path | None = None, hidden_2: int = 32):
    """A diffusers StableDiffusionXL(Img2Img)Pipeline with tiny random weights: two text encoders (CLIP-L
    and a bigG-like one with a projection), addition_embed_type "text_time" (pooled embedding + six
    micro-conditioning numbers), 64x64 images. refiner: only the second encoder, aesthetic-score ids."""
    import tempfile

    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = write_tokenizer(Path(tokenizer_dir or tempfile.mkdtemp()))
    text_kw = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                   num_hidden_layers=3, vocab_size=len(tokenizer), max_position_embeddings=77, hidden_act="gelu",
                   projection_dim=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_kw))
    # hidden_2: the second encoder's width (bigG's 1280 beside ViT-L's 768 in the real model; diffusers' single-file
    # loader tells the two apart by it)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**text_kw, "hidden_size": hidden_2}))
    # time ids: 6 numbers x addition_time_embed_dim 8, plus the pooled 32 (the refiner: 5 numbers)
    ids = 5 if refiner else 6
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=ids * 8 + 32,
        cross_attention_dim=hidden_2 if refiner else 32 + hidden_2, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=64, force_upcast=True, scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    if refiner:
        return StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=text_encoder_2,
                                                tokenizer=None, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                                requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)


def save_tiny_sdxl(folder: Path, **kw) -> Path:
    pipe = build_sdxl_pipeline(tokenizer_dir=folder.parent / (folder.name + "-tok"), **kw)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
