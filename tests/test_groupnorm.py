"""GroupNorm from per-channel statistics (accel/groupnorm.py) against torch's own in float64: values and
gradients, in either memory layout, eager and compiled, and a U-Net whose GroupNorms it replaces. (Against
float64, not torch's float32: on the CPU torch's channels_last kernel is the less exact of the two, 9e-5 off on
these inputs where this one is 1e-6.)"""

import pytest
import torch
import torch.nn.functional as F

from ldm_cli.accel.groupnorm import ChannelStatsGroupNorm, group_norm_by_channel, use_channel_stats


def inputs(channels_last: bool, affine: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    # an offset mean per channel and a spread of scales: E[x^2] - E[x]^2 would lose digits here, the pairwise
    # combination must not
    x = torch.randn(3, 64, 12, 10, generator=g) * torch.rand(1, 64, 1, 1, generator=g) * 4 + 20 * torch.randn(
        1, 64, 1, 1, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(64, generator=g) if affine else None
    b = torch.randn(64, generator=g) if affine else None
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    return x, w, b, leaves, torch.randn(3, 64, 12, 10, generator=g)


def exact(x, w, b, grad, eps):
    """torch's group_norm in float64 and its gradients (x, then weight and bias if given), in float32."""
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b) if t is not None]
    y = F.group_norm(leaves[0], 32, *(leaves[1:] or [None, None]), eps)
    return y.float(), [g.float() for g in torch.autograd.grad(y, leaves, grad.double())]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_values_and_gradients_equal_torchs_group_norm(channels_last, affine):
    x, w, b, leaves, grad = inputs(channels_last, affine, seed=int(channels_last) + 2 * int(affine))
    want, grads = exact(x, w, b, grad, 1e-5)
    got = group_norm_by_channel(x, 32, w, b, 1e-5)
    assert got.dtype == x.dtype and got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g_want, g_got in zip(grads, torch.autograd.grad(got, leaves, grad)):
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-4)
    # the check can fail: a wrong group count (64 groups of 1 channel) is far off
    assert (group_norm_by_channel(x, 64, w, b, 1e-5) - want).abs().max() > 0.1


def test_compiled_in_channels_last_equals_torchs_group_norm():
    x, w, b, leaves, grad = inputs(True, True, seed=5)
    want, grads = exact(x, w, b, grad, 1e-6)
    got = torch.compile(group_norm_by_channel)(x, 32, w, b, 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g_want, g_got in zip(grads, torch.autograd.grad(got, leaves, grad)):
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-4)


def test_a_unet_with_its_group_norms_replaced_computes_the_same(unet):
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 700])
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        want = unet(x, t, context).sample
    keys = set(unet.state_dict())
    count = use_channel_stats(unet)
    assert count == sum(isinstance(m, torch.nn.GroupNorm) for m in unet.modules()) > 0
    assert all(type(m) is not torch.nn.GroupNorm for m in unet.modules())
    assert set(unet.state_dict()) == keys  # the same parameters: saved and loaded as before
    with torch.no_grad():
        got = unet(x, t, context).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert isinstance(next(m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)), ChannelStatsGroupNorm)
