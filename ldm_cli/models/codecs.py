"""Encode and decode around the U-Net: prompts -> CLIP hidden states, pixels <-> latents, VAE tiling."""

import torch

from ldm_cli.models.components import Components


@torch.no_grad()
def encode_text(c: Components, prompts: list[str]) -> torch.Tensor:
    """CLIP hidden states [B, 77, D] for prompts, padded to the tokenizer's max length (as SD was trained)."""
    if c.batch_invariant and len(prompts) > 1:
        return torch.cat([encode_text(c, [p]) for p in prompts])
    tok = c.tokenizer(prompts, padding="max_length", max_length=c.tokenizer.model_max_length,
                      truncation=True, return_tensors="pt")
    mask = tok.attention_mask.to(c.device) if getattr(c.text_encoder.config, "use_attention_mask", False) else None
    return c.text_encoder(tok.input_ids.to(c.device), attention_mask=mask)[0].to(c.dtype)


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
