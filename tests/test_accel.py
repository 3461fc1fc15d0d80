"""The inductor graph pass of `--accel compile` (ldm_cli/accel/inductor.py): layouts change, values do not."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from ldm_cli.accel.inductor import channels_last_concat_pass


class UpBlockLike(torch.nn.Module):
    """What the U-Net's up blocks do: concatenate upsampled features with a skip connection, then
    GroupNorm, SiLU and a convolution (plus a 1x1 shortcut on the concatenation)."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, 12)
        self.conv = torch.nn.Conv2d(12, 4, 3, padding=1)
        self.shortcut = torch.nn.Conv2d(12, 4, 1)

    def forward(self, x, skip):
        h = torch.cat([self.up(x), skip], dim=1)
        return self.conv(torch.nn.functional.silu(self.norm(h))) + self.shortcut(h)


def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 6, 6, generator=g).to(memory_format=torch.channels_last)
    skip = torch.randn(2, 4, 6, 6, generator=g).to(memory_format=torch.channels_last)
    return x, skip


def model():
    torch.manual_seed(0)
    return UpBlockLike().eval().to(memory_format=torch.channels_last)


def count(graph, target):
    return sum(node.target is target for node in graph.nodes)


def test_pass_pins_channels_last_concatenations_and_keeps_values():
    graph_pass = channels_last_concat_pass()  # also registers the prim it inserts
    force = torch.ops.prims.inductor_force_stride_order.default
    m, (x, skip) = model(), inputs()
    with torch.no_grad():
        gm = make_fx(m)(x, skip)
        assert count(gm.graph, force) == 0
        graph_pass(gm.graph)
        gm.recompile()
        assert count(gm.graph, torch.ops.aten.cat.default) == 1
        assert count(gm.graph, force) == 1
        (cat,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.cat.default]
        assert [u.target for u in cat.users] == [force]  # GroupNorm and the shortcut now read the pinned one
        (pinned,) = cat.users
        assert pinned.args[1] == torch.empty(2, 12, 6, 6).to(memory_format=torch.channels_last).stride()
        assert torch.equal(gm(x, skip), m(x, skip))


def test_pass_leaves_other_concatenations_alone():
    def f(a, b, c, d):
        return torch.cat([a, b], dim=1) * 2, torch.cat([c, d])  # NCHW 4-D, and 2-D

    a, b = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    gm = make_fx(f)(a, b, torch.randn(2, 3), torch.randn(2, 3))
    before = [str(n) for n in gm.graph.nodes]
    channels_last_concat_pass()(gm.graph)
    assert [str(n) for n in gm.graph.nodes] == before


@pytest.mark.slow
def test_compiled_with_the_pass_equals_eager():
    """Inductor (its CPU backend here; the GPU lowers the same graph) accepts the pinned graph."""
    import torch._inductor.config as inductor

    graph_pass, pinned = channels_last_concat_pass(), []

    def counted(graph):  # the pass, and how many concatenations it pinned
        graph_pass(graph)
        pinned.append(count(graph, torch.ops.prims.inductor_force_stride_order.default))

    m, (x, skip) = model(), inputs()
    with torch.no_grad(), inductor.patch(post_grad_custom_post_pass=counted, force_disable_caches=True):
        torch._dynamo.reset()
        compiled = torch.compile(m, fullgraph=True, dynamic=False)
        torch.testing.assert_close(compiled(x, skip), m(x, skip), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    assert pinned == [1]


def test_the_pass_keeps_inductors_graph_cache_working(tmp_path, monkeypatch):
    """A second process must load the compiled U-Net from disk, not compile it again: the pass has a
    cache key (uuid), so inductor's FX graph cache still hits."""
    import torch._inductor.config as inductor
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    m, (x, skip) = model(), inputs()
    counters.clear()
    with torch.no_grad(), inductor.patch(post_grad_custom_post_pass=channels_last_concat_pass(), fx_graph_cache=True):
        for _ in range(2):
            torch._dynamo.reset()
            torch.compile(m, fullgraph=True, dynamic=False)(x, skip)
    torch._dynamo.reset()
    assert counters["inductor"]["fxgraph_cache_miss"] == 1
    assert counters["inductor"]["fxgraph_cache_hit"] == 1
