"""Encode and decode around the U-Net: prompts -> CLIP hidden states, pixels <-> latents, VAE tiling."""

import torch

from ldm_cli.errors import check
from ldm_cli.models.components import Components


@torch.no_grad()
def encode_text(c: Components, prompts: list[str], syntax: str = "plain", clip_skip: int = 1) -> torch.Tensor:
    """CLIP token states [B, 77 k, D] for prompts. plain: each padded or cut to the tokenizer's max length
    (as SD was trained); a1111: AUTOMATIC1111's emphasis, BREAK and chunks of 75 tokens (text/encode.py),
    shorter prompts padded with the empty prompt's chunks, <lora:...> tags taken out (text/networks.py).
    clip_skip: 1 = the last layer (A1111's count)."""
    from ldm_cli.models.embeddings import expand
    from ldm_cli.text import encode as a1111
    from ldm_cli.text.networks import strip_networks

    if syntax == "a1111":  # <lora:...> tags name what the loader applied; they are not text
        prompts = [strip_networks(p) for p in prompts]
    prompts = [expand(p, c.tokenizer) for p in prompts]  # multi-vector embeddings written out
    use_mask = getattr(c.text_encoder.config, "use_attention_mask", False)
    layers = c.text_encoder.config.num_hidden_layers
    check(1 <= clip_skip <= layers, f"--clip-skip {clip_skip}: this text encoder has {layers} layers")
    if syntax == "a1111":
        z = [a1111.encode(c.tokenizer, c.text_encoder, p, c.device, clip_skip, use_mask) for p in prompts]
        longest = max(t.shape[1] for t in z)
        if any(t.shape[1] != longest for t in z):
            empty = a1111.encode(c.tokenizer, c.text_encoder, "", c.device, clip_skip, use_mask)
            z = [a1111.pad_to(t, longest, empty) for t in z]
        return torch.cat(z).to(c.dtype)
    if c.batch_invariant and len(prompts) > 1:
        return torch.cat([encode_text(c, [p], syntax, clip_skip) for p in prompts])
    tok = c.tokenizer(prompts, padding="max_length", max_length=c.tokenizer.model_max_length,
                      truncation=True, return_tensors="pt")
    mask = tok.attention_mask.to(c.device) if use_mask else None
    return a1111.states(c.text_encoder, tok.input_ids.to(c.device), clip_skip, mask).to(c.dtype)


@torch.no_grad()
def encode_text_sdxl(c: Components, prompts: list[str], syntax: str = "plain") -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning (StableDiffusionXLPipeline.encode_prompt): each text encoder's penultimate
    hidden states, concatenated on the feature axis ([B, 77, 768 + 1280] for SDXL base, 1280 for the
    refiner), and the second encoder's pooled, projected embedding [B, 1280]. a1111: emphasis, BREAK and
    chunks as for SD (text/encode.encode_sdxl); shorter prompts padded with the empty prompt's chunks."""
    from ldm_cli.models.embeddings import expand

    prompts = [expand(p, c.tokenizer_2) for p in prompts]  # multi-vector embeddings written out
    if syntax == "a1111":
        from ldm_cli.text import encode as a1111
        from ldm_cli.text.networks import strip_networks

        prompts = [strip_networks(p) for p in prompts]
        pairs = [(t, e) for t, e in ((c.tokenizer, c.text_encoder), (c.tokenizer_2, c.text_encoder_2)) if e is not None]
        encoded = [a1111.encode_sdxl(pairs, p, c.device) for p in prompts]
        longest = max(h.shape[1] for h, _ in encoded)
        if any(h.shape[1] != longest for h, _ in encoded):
            empty = a1111.encode_sdxl(pairs, "", c.device)[0]
            encoded = [(a1111.pad_to(h, longest, empty), p) for h, p in encoded]
        return (torch.cat([h for h, _ in encoded]).to(c.text_encoder_2.dtype), torch.cat([p for _, p in encoded]))
    if c.batch_invariant and len(prompts) > 1:
        pairs = [encode_text_sdxl(c, [p], syntax) for p in prompts]
        return torch.cat([h for h, _ in pairs]), torch.cat([p for _, p in pairs])
    states, pooled = [], None
    for tokenizer, encoder in ((c.tokenizer, c.text_encoder), (c.tokenizer_2, c.text_encoder_2)):
        if encoder is None:  # the refiner has only the second
            continue
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids.to(c.device), output_hidden_states=True)
        if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds first
            pooled = out[0]
        states.append(out.hidden_states[-2])  # the penultimate layer, as SDXL was trained
    return torch.cat(states, dim=-1).to(c.text_encoder_2.dtype), pooled


@torch.no_grad()
def encode_image(c: Components, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Pixels in [-1, 1], [1, 3, H, W] -> latent, drawn from the VAE posterior with `generator`."""
    pixels = pixels.to(c.device, vae_dtype(c))
    use_vae_tiling(c, *pixels.shape[-2:])
    out = c.vae.encode(pixels)
    # AutoencoderKL gives a posterior to sample; AutoencoderTiny gives the latent itself.
    latent = out.latent_dist.sample(generator) if hasattr(out, "latent_dist") else out.latents
    return c.vae.config.scaling_factor * latent.to(c.dtype)


def vae_dtype(c: Components) -> torch.dtype:
    """The VAE's own dtype: fp32 for SDXL's VAE under fp16 (it overflows there; load.py upcasts it)."""
    return next(c.vae.parameters()).dtype


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
    image = c.vae.decode((latents / c.vae.config.scaling_factor).to(vae_dtype(c)), return_dict=False)[0]
    return (image / 2 + 0.5).clamp(0, 1).float()
