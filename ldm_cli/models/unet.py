"""The U-Net call protocol: `f(x, t, context) -> output`, where `context` may hold k contexts per latent
(guidance: [uncond; cond]); the plain runner here, faster ones in `accel`."""

import torch

from ldm_cli.diffusion.conditioning import unet_kwargs
from ldm_cli.models.components import Components


def plain_runner(c: Components):
    """The U-Net as `f(x, t, context) -> output`, the signature guidance.guided expects: `context` may
    hold k contexts per latent (guidance: [uncond; cond]), see `call_unet`. accel.build_runner returns
    this on CPU (and with --accel none), a CUDA-graphed or compiled one on CUDA."""

    def f(x, t, context):
        if not c.batch_invariant:
            return call_unet(c.unet, x, t, context)
        pairs = len(context) // len(x)  # one latent (and its k contexts) per call, whatever the batch
        outs = [call_unet(c.unet, x[i:i + 1], t, context[i::len(x)]) for i in range(len(x))]
        return torch.cat([out[j:j + 1] for j in range(pairs) for out in outs])

    return f


def call_unet(unet, x: torch.Tensor, t: torch.Tensor, context) -> torch.Tensor:
    """The U-Net's output for latents `x` under `context` (a tensor, or SDXL's conditioning.AddedCond),
    whose batch is k times x's: each latent is
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
        return unet(x, t, **unet_kwargs(context), return_dict=False)[0]
    shared.halves_equal = True
    try:
        return unet(x, t, **unet_kwargs(context), return_dict=False)[0]
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
