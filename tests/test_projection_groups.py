"""Linear layers that share their input run as one matmul (accel.projections.group_shared_input_projections)."""

import copy

import pytest
import torch
from tiny import guided_inputs

from ldm_cli.accel.projections import GroupedLinear, group_shared_input_projections
from ldm_cli.models.unet import call_unet


class LinearCount:
    """Counts F.linear calls (every nn.Linear and every group matmul goes through it)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        inner = torch.nn.functional.linear

        def counted(*args, **kwargs):
            self.calls += 1
            return inner(*args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "linear", counted)


def members(unet, group):
    return [m for m in unet.modules() if isinstance(m, GroupedLinear) and m.group is group]


@torch.no_grad()
@pytest.mark.parametrize("fused", [False, True])
def test_grouped_projections_keep_the_output_with_one_matmul_per_group(unet, fused, monkeypatch):
    if fused:
        unet.fuse_qkv_projections()
    before = copy.deepcopy(unet)
    x, t, context = guided_inputs(unet, 2)
    cross = [m for m in unet.modules() if getattr(m, "is_cross_attention", False)]
    resnets = [m for m in unet.modules() if hasattr(m, "time_emb_proj")]

    groups = group_shared_input_projections(unet)

    context_group, time_group = groups
    keys_values = [[m.to_kv] if fused else [m.to_k, m.to_v] for m in cross]
    assert members(unet, context_group) == [layer for pair in keys_values for layer in pair]
    assert len(cross) > 1 and members(unet, time_group) == [m.time_emb_proj for m in resnets]
    count = LinearCount(monkeypatch)
    expected = call_unet(before, x, t, context)
    plain_calls, count.calls = count.calls, 0
    out = call_unet(unet, x, t, context)
    saved = len(members(unet, context_group)) - 1 + len(members(unet, time_group)) - 1
    assert count.calls == plain_calls - saved
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert not context_group.active and context_group.output is None  # off again after the forward


@torch.no_grad()
def test_members_are_views_of_the_group_and_plain_layers_outside_a_forward(unet):
    unet.fuse_qkv_projections()
    context_group, time_group = group_shared_input_projections(unet)
    for group in (context_group, time_group):
        start = 0
        for m in members(unet, group):  # the group's weight is the members' weights, in order, not a copy
            assert m.weight.data_ptr() == group.weight[start].data_ptr()
            start += m.out_features
        assert start == len(group.weight)
    layer = members(unet, time_group)[3]
    h = torch.randn(2, layer.in_features)
    torch.testing.assert_close(layer(h), h @ layer.weight.T + layer.bias, rtol=0, atol=1e-6)


@torch.no_grad()
def test_a_unet_the_probe_cannot_call_is_left_as_it_is(unet):
    from diffusers import UNet2DConditionModel

    config = dict(unet.config)
    config.update(class_embed_type="timestep", num_class_embeds=None)  # needs class_labels in every call
    other = UNet2DConditionModel.from_config(config)
    assert group_shared_input_projections(other) == []
    assert not any(isinstance(m, GroupedLinear) for m in other.modules())


@torch.no_grad()
def test_compiled_unet_with_groups_matches_eager(unet):
    """As `--accel compile` runs it (fullgraph): dynamo traces the hooks and the group's shared output."""
    unet.fuse_qkv_projections()
    before = copy.deepcopy(unet)
    x, t, context = guided_inputs(unet, 2)
    expected = call_unet(before, x, t, context)
    groups = group_shared_input_projections(unet)
    linears = []

    def backend(gm, example_inputs):  # records how many linear layers the traced graph runs
        linears.append(sum(node.target is torch._C._nn.linear for node in gm.graph.nodes))
        return gm.forward

    try:
        call_unet(torch.compile(before, fullgraph=True, dynamic=False, backend=backend), x, t, context)
        traced = call_unet(torch.compile(unet, fullgraph=True, dynamic=False, backend=backend), x, t, context)
        compiled = call_unet(torch.compile(unet, fullgraph=True, dynamic=False, backend="aot_eager"), x, t, context)
    finally:
        torch._dynamo.reset()
    saved = sum(len(members(unet, g)) - 1 for g in groups)
    assert linears == [linears[0], linears[0] - saved]  # each group is one linear in the graph
    torch.testing.assert_close(traced, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(compiled, expected, rtol=0, atol=1e-5)
    assert all(not g.active and g.output is None for g in groups)


@torch.no_grad()
def test_groups_are_off_after_a_forward_that_raises(unet):
    groups = group_shared_input_projections(unet)
    x, t, context = guided_inputs(unet, 2)
    with pytest.raises(RuntimeError):
        call_unet(unet, x, t, context[..., :-1])  # a context one channel short: the first key projection fails
    assert groups and all(not g.active and g.output is None for g in groups)
