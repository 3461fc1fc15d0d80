"""Guidance's two halves share the U-Net's first self-attention (models.unet.call_unet): same output, half the work."""

import pytest
import torch
from tiny import guided_inputs

from ldm_cli.models.unet import SharedHalvesAttention, call_unet, first_self_attention


class BatchSpy:
    """Wraps an attention processor and records the batch sizes it is called with."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def __call__(self, attn, hidden_states, *args, **kwargs):
        self.batches.append(len(hidden_states))
        return self.inner(attn, hidden_states, *args, **kwargs)


def first_attn1(unet):
    return next(b for b in unet.down_blocks if getattr(b, "attentions", None)).attentions[0].transformer_blocks[0].attn1


@torch.no_grad()
@pytest.mark.parametrize("fused", [False, True])
def test_shared_first_self_attention_keeps_the_output_and_halves_its_batch(unet, fused):
    if fused:
        unet.fuse_qkv_projections()  # replaces every processor: the wrapper must come back
    x, t, context = guided_inputs(unet, 3)
    expected = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample
    shared = first_self_attention(unet)
    assert isinstance(shared, SharedHalvesAttention)
    spy = shared.inner = BatchSpy(shared.inner)
    out = call_unet(unet, x, t, context)
    assert spy.batches == [len(x)]  # not 2 * len(x): the first self-attention ran once for both halves
    assert not shared.halves_equal  # reset after the call
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # other self-attentions still see the whole batch
    later = [m for m in unet.modules() if hasattr(m, "attn1") and m.attn1 is not first_attn1(unet)]
    assert later and all(not isinstance(m.attn1.processor, SharedHalvesAttention) for m in later)


@torch.no_grad()
def test_one_context_per_latent_shares_nothing(unet):
    x, t, context = guided_inputs(unet, 3)
    x = torch.cat([x[:2], torch.randn_like(x[:1])])  # its first and second half differ
    context = context[:len(x)]
    expected = unet(x, t, encoder_hidden_states=context).sample
    shared = first_self_attention(unet)  # installed, as after a guided call
    spy = shared.inner = BatchSpy(shared.inner)
    out = call_unet(unet, x, t, context)
    assert spy.batches == [len(x)]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_a_context_batch_that_is_not_a_multiple_is_refused(unet):
    x, t, context = guided_inputs(unet, 3)
    with pytest.raises(ValueError, match="not a multiple"):
        call_unet(unet, x, t, context[:-1])


def test_not_shared_where_the_context_reaches_the_network_before_it(unet):
    from diffusers import UNet2DConditionModel

    config = dict(unet.config)
    config.update(class_embed_type="timestep")  # a class embedding added to the time embedding: halves differ
    other = UNet2DConditionModel.from_config(config)
    assert first_self_attention(other) is None
    assert isinstance(first_self_attention(unet), SharedHalvesAttention)


@torch.no_grad()
def test_compiled_unet_shares_and_recompiles_when_not_shared(unet):
    """As `--accel compile` runs it (fullgraph): dynamo traces through the wrapper, and a later call
    without shared halves must not replay the shared graph (its guard on `halves_equal`)."""
    unet.fuse_qkv_projections()
    x, t, context = guided_inputs(unet, 2)
    different = torch.cat([x, torch.randn_like(x)])  # halves that differ, same shapes as the shared call's
    expected = [unet(batch, t, encoder_hidden_states=context).sample for batch in (torch.cat([x, x]), different)]
    compiled = torch.compile(unet, fullgraph=True, dynamic=False, backend="aot_eager")
    try:
        shared = call_unet(compiled, x, t, context)
        unshared = call_unet(compiled, different, t, context)  # one context per latent: nothing shared
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(shared, expected[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(unshared, expected[1], rtol=0, atol=1e-5)
    spy = BatchSpy(first_self_attention(unet).inner)
    first_self_attention(unet).inner = spy
    call_unet(unet, x, t, context)
    assert spy.batches == [len(x)]
