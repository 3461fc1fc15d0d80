"""Guidance's two halves share the U-Net's first ResNet block and first self-attention (models.call_unet):
same output, half the work there."""

import pytest
import torch
from tiny import guided_inputs

from ldm_cli.accel import group_shared_input_projections
from ldm_cli.models import SharedHalvesAttention, call_unet, shared_halves


class BatchSpy:
    """Wraps an attention processor and records the batch sizes it is called with."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def __call__(self, attn, hidden_states, *args, **kwargs):
        self.batches.append(len(hidden_states))
        return self.inner(attn, hidden_states, *args, **kwargs)


def record_batches(module):
    """The batch sizes `module`'s forward gets, appended to the returned list."""
    batches = []
    module.register_forward_pre_hook(lambda m, args: batches.append(len(args[0])))
    return batches


def first_attn1(unet):
    return next(b for b in unet.down_blocks if getattr(b, "attentions", None)).attentions[0].transformer_blocks[0].attn1


def spy_on_shared_layers(unet):
    """(first attention's processor spy, first ResNet's conv1 batches, second ResNet's conv1 batches)."""
    shared = shared_halves(unet)
    spy = shared.attention().inner = BatchSpy(shared.attention().inner)
    resnets = [r for b in unet.down_blocks for r in b.resnets]
    return spy, record_batches(resnets[0].conv1), record_batches(resnets[1].conv1)


@torch.no_grad()
@pytest.mark.parametrize("fused", [False, True])
def test_shared_layers_keep_the_output_and_halve_their_batch(unet, fused):
    if fused:
        unet.fuse_qkv_projections()  # replaces every processor: the wrapper must come back
    x, t, context = guided_inputs(unet, 3)
    expected = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample
    assert isinstance(shared_halves(unet).attention(), SharedHalvesAttention)
    attention, first_resnet, second_resnet = spy_on_shared_layers(unet)
    out = call_unet(unet, x, t, context)
    assert attention.batches == [len(x)]  # not 2 * len(x): ran once for both halves
    assert first_resnet == [len(x)]
    assert second_resnet == [2 * len(x)]  # the layers after them see the whole batch
    assert not shared_halves(unet).equal  # reset after the call
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    later = [m for m in unet.modules() if hasattr(m, "attn1") and m.attn1 is not first_attn1(unet)]
    assert later and all(not isinstance(m.attn1.processor, SharedHalvesAttention) for m in later)


@torch.no_grad()
def test_shared_layers_with_grouped_time_projections(unet):
    """accel's time-embedding group computes every ResNet's projection at the first one's call: the
    shared ResNet must hand it the whole batch, and halve only its own share."""
    x, t, context = guided_inputs(unet, 2)
    expected = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample
    assert len(group_shared_input_projections(unet)) == 2  # context and time
    _, first_resnet, _ = spy_on_shared_layers(unet)
    out = call_unet(unet, x, t, context)
    assert first_resnet == [len(x)]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@torch.no_grad()
def test_one_context_per_latent_shares_nothing(unet):
    x, t, context = guided_inputs(unet, 3)
    x = torch.cat([x[:2], torch.randn_like(x[:1])])  # its first and second half differ
    context = context[:len(x)]
    expected = unet(x, t, encoder_hidden_states=context).sample
    attention, first_resnet, _ = spy_on_shared_layers(unet)  # installed, as after a guided call
    out = call_unet(unet, x, t, context)
    assert attention.batches == [len(x)] and first_resnet == [len(x)]
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
    assert shared_halves(other) is None
    assert shared_halves(unet) is not None


@torch.no_grad()
def test_compiled_unet_shares_and_recompiles_when_not_shared(unet):
    """As `--accel compile` runs it (fullgraph): dynamo traces through the hooks and the wrapper, and a
    later call without shared halves must not replay the shared graph (its guard on `equal`)."""
    unet.fuse_qkv_projections()
    group_shared_input_projections(unet)
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
    attention, first_resnet, _ = spy_on_shared_layers(unet)
    call_unet(unet, x, t, context)
    assert attention.batches == [len(x)] and first_resnet == [len(x)]


@torch.no_grad()
def test_sd_layout_shares_the_first_blocks_resnet_and_attention():
    """SD-1.x/2.x start with a cross-attention down block: its ResNet, then its self-attention."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, cross_attention_dim=32, norm_num_groups=8,
        attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    x, t, context = guided_inputs(unet, 2)
    expected = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample
    shared = shared_halves(unet)
    assert shared.resnet is unet.down_blocks[0].resnets[0]
    assert shared.attn1 is unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    attention, first_resnet, second_resnet = spy_on_shared_layers(unet)
    out = call_unet(unet, x, t, context)
    assert attention.batches == [len(x)] and first_resnet == [len(x)] and second_resnet == [2 * len(x)]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@torch.no_grad()
def test_compiled_unet_called_unshared_first_still_shares_later(unet):
    """A guided call after an unguided one of the same shapes must not replay the unshared graph (its
    values would be right, but nothing shared): dynamo does not guard on module hooks, so call_unet sets
    them up on every call, before the first compiled one."""
    x, t, context = guided_inputs(unet, 2)
    different = torch.cat([x, torch.randn_like(x)])
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(unet, fullgraph=True, dynamic=False, backend=backend)
    try:
        call_unet(compiled, different, t, context)  # one context per latent: nothing shared
        call_unet(compiled, x, t, context)  # guided, same shapes
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 2  # traced again, with the halves shared

    def image_batches(gm):  # the batch sizes of the feature maps (8x8 and 16x16) the graph computes
        values = [n.meta.get("example_value") for n in gm.graph.nodes]
        return {v.shape[0] for v in values if isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[-1] >= 8}

    assert image_batches(graphs[0]) == {2 * len(x)}
    assert image_batches(graphs[1]) == {len(x), 2 * len(x)}  # the shared ResNet ran on one half
