"""GPU speed: channels_last, fused QKV, CUDA graphs for the U-Net, optional torch.compile.

Why CUDA graphs: at batch 1 an SD-1.5 U-Net call is ~1,000 small kernels, and eager PyTorch spends
longer launching them from Python than the GPU spends running them (diffusers' default: 44 ms per
step on an H100, for ~10 ms of GPU work). A graph captured once per input shape replays every
kernel with one launch. Capture costs about a second, not the ~100 s of torch.compile.
"""

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm_cli.errors import check
from ldm_cli.models import Components, call_unet

MODES = ("auto", "none", "graphs", "compile")


class GraphedUNet:
    """`f(x, t, context)` (as models.call_unet) replaying one captured CUDA graph per (shapes, dtype).

    The returned tensor is a static buffer, overwritten by the next call: callers use it before
    calling again (the sampler does: guidance and the DDIM step make new tensors from it).
    """

    def __init__(self, unet):
        self.unet = unet
        self.graphs = {}
        self.pool = torch.cuda.graph_pool_handle()

    def _forward(self, x, t, context):
        return call_unet(self.unet, x, t, context)

    def __call__(self, x, t, context):
        key = (tuple(x.shape), tuple(context.shape), x.dtype)
        if key not in self.graphs:
            self.graphs[key] = self._capture(x, t, context)
        graph, (x_in, t_in, ctx_in), out = self.graphs[key]
        x_in.copy_(x)
        t_in.copy_(t)
        ctx_in.copy_(context)
        graph.replay()
        return out

    @torch.no_grad()
    def _capture(self, x, t, context):
        inputs = (x.clone(), t.clone(), context.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up: cuDNN/cuBLAS pick algorithms, lazy inits run
            for _ in range(2):
                self._forward(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(*inputs)
        return graph, inputs, out


def cache_dir() -> Path:
    return Path(os.environ.get("LDM_CACHE_DIR", Path.home() / ".cache" / "ldm"))


def accelerate(c: Components, mode: str = "auto", channels_last: bool | None = None,
               fuse_qkv: bool = True, group_projections: bool | None = None) -> Components:
    """Make `c` fast on its device; a no-op on CPU (where `auto` means `none`). channels_last=None:
    on with compile (inductor writes NHWC GroupNorm kernels that eager PyTorch lacks), off otherwise.
    group_projections=None: on with compile, see group_shared_input_projections."""
    check(mode in MODES, f"--accel must be one of {', '.join(MODES)}, got {mode!r}")
    if c.device.type != "cuda" or mode == "none":
        check(mode in ("auto", "none"), f"--accel {mode} needs a CUDA device")
        return c
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    # cuDNN autotuning tries every algorithm for each new conv shape: seconds at start-up, which a
    # one-image run never earns back. Worth it only where the process is long anyway (compile).
    torch.backends.cudnn.benchmark = mode == "compile"
    # channels_last is off in eager modes: on an H100 it made batch 8 slower (GroupNorm's NHWC kernels are
    # slow in eager PyTorch), see bench/RESULTS.md.
    if channels_last if channels_last is not None else mode == "compile":
        c.unet.to(memory_format=torch.channels_last)
        c.vae.to(memory_format=torch.channels_last)
    if fuse_qkv and hasattr(c.unet, "fuse_qkv_projections"):
        c.unet.fuse_qkv_projections()  # one (3x wider) matmul instead of three for q, k, v
    # Its probe forward costs ~1 s in a fresh process (every kernel's first use) for ~5 ms per image
    # uncompiled, ~8 ms compiled (bench/RESULTS.md, session 8): worth it where the process is long anyway.
    if group_projections if group_projections is not None else mode == "compile":
        group_shared_input_projections(c.unet)
    unet = c.unet
    if mode == "compile":
        # Inductor's caches on disk make the second process compile from cache, not from scratch.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
        os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
        os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
        _tune_inductor()
        unet = torch.compile(c.unet, fullgraph=True, dynamic=False)
        # The decoder module, not vae.decode: tiled decoding calls it once per (same-sized) tile.
        c.vae.decoder = torch.compile(c.vae.decoder, fullgraph=True, dynamic=False)
    c.unet_runner = GraphedUNet(unet)
    return c


class ProjectionGroup:
    """Linear layers that get the same input in every U-Net forward, run as one matmul.

    Why: in an SD U-Net, 16 cross-attentions project the same text context to keys and values, and 22
    ResNet blocks project the same time embedding to their channels. Each is a small matmul (at batch
    1 a few microseconds of a ~6.4 ms call on an H100), and there are ~40 of them. One matmul over the
    members' concatenated weights computes them all; each member returns its columns of it.

    While `active` (the U-Net's forward, see group_shared_input_projections), the first member called
    computes `output` for the group and the others slice it; outside a forward each member is the
    plain nn.Linear it was. The members' weights become views of the group's, so nothing is copied."""

    def __init__(self, linears: list[torch.nn.Linear]):
        self.weight = torch.cat([m.weight.detach() for m in linears])
        self.bias = None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears])
        self.active, self.output = False, None
        start = 0
        for m in linears:
            stop = start + m.out_features
            m.weight = torch.nn.Parameter(self.weight[start:stop], requires_grad=False)
            if self.bias is not None:
                m.bias = torch.nn.Parameter(self.bias[start:stop], requires_grad=False)
            m.__class__ = GroupedLinear
            m.group, m.columns = self, slice(start, stop)
            start = stop


class GroupedLinear(torch.nn.Linear):
    """A member of a ProjectionGroup (set up by it, never built directly)."""

    group: ProjectionGroup
    columns: slice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.group
        if not group.active:
            return super().forward(x)
        if group.output is None:
            group.output = F.linear(x, group.weight, group.bias)
        return group.output[..., self.columns]


def group_shared_input_projections(unet) -> list[ProjectionGroup]:
    """Put the U-Net's cross-attention key/value projections, and its ResNet blocks' time-embedding
    projections, into one ProjectionGroup each, where they do share their input.

    Which layers share an input is found, not assumed: one small forward records what every
    candidate receives, and a group takes the candidates that were called with the same values as the
    first (unused layers, e.g. to_k and to_v once fused into to_kv, are not called, so left out). A
    U-Net that this forward cannot run (it needs inputs beyond latent, time and context) is left as it
    is. Hooks on the U-Net switch the groups on for the length of each forward."""
    families = {"context": [], "time": []}
    for module in unet.modules():
        for child_name, child in module.named_children():
            if type(child) is not torch.nn.Linear:  # plain layers only: a LoRA-wrapped one stays as it is
                continue
            if child_name == "time_emb_proj":
                families["time"].append(child)
            elif child_name in ("to_k", "to_v", "to_kv") and getattr(module, "is_cross_attention", False):
                families["context"].append(child)
    inputs = {}  # candidate -> the inputs it was called with in the probe forward

    def record(module, args):
        inputs.setdefault(module, []).append(args[0])

    hooks = [m.register_forward_pre_hook(record) for family in families.values() for m in family]
    try:
        _probe_forward(unet)
    except Exception:  # noqa: BLE001 (any failure means: not a U-Net this knows how to call)
        return []
    finally:
        for hook in hooks:
            hook.remove()
    groups = []
    for family in families.values():
        once = [m for m in family if len(inputs.get(m, ())) == 1]  # a layer called twice could differ
        members = [m for m in once if torch.equal(inputs[m][0], inputs[once[0]][0])] if once else []
        if len(members) > 1 and len({(m.in_features, m.weight.dtype, m.bias is None) for m in members}) == 1:
            groups.append(ProjectionGroup(members))
    if groups:
        def switch(on):
            def hook(*_):
                for group in groups:
                    group.active, group.output = on, None
            return hook

        unet.register_forward_pre_hook(switch(True))
        unet.register_forward_hook(switch(False), always_call=True)  # off even when the forward raises
    return groups


@torch.no_grad()
def _probe_forward(unet) -> None:
    """One forward on random inputs: latents as small as the U-Net's downsampling allows, 4 context tokens."""
    param = next(unet.parameters())
    side = 2 ** len(getattr(unet, "down_blocks", []))
    g = torch.Generator(param.device).manual_seed(0)
    x = torch.randn(1, unet.config.in_channels, side, side, generator=g, device=param.device).to(param.dtype)
    context = torch.randn(1, 4, unet.config.cross_attention_dim, generator=g, device=param.device).to(param.dtype)
    unet(x, torch.tensor([10], device=param.device), encoder_hidden_states=context, return_dict=False)


def _tune_inductor() -> None:
    """Inductor settings from PyTorch's "Diffusion, Fast" recipe that cost no compile time: 1x1
    convolutions as matmuls (fusable with their neighbours), and no epilogue fusion into matmul
    templates. Its coordinate-descent tuning of Triton block sizes is left off: on an H100 the first
    compile at batch 1 had not finished after 400 s (bench/RESULTS.md). Plus our one graph pass."""
    import torch._inductor.config as inductor

    inductor.conv_1x1_as_mm = True
    inductor.epilogue_fusion = False
    inductor.post_grad_custom_post_pass = channels_last_concat_pass()


def channels_last_concat_pass():
    """An inductor graph pass that keeps every channels-last 4-D concatenation channels-last.

    Why: the U-Net's up blocks concatenate the upsampled features with the skip connection
    (`torch.cat(dim=1)`) and feed the result to GroupNorm and a convolution, all channels-last. Inductor
    (torch 2.11) writes that concatenation out in the default NCHW layout, so the next kernel (GroupNorm
    apply + SiLU, writing channels-last for the convolution) reads it transposed at ~0.5 TB/s: 1.8 ms of
    a 35 ms batch-16 U-Net call on an H100 (bench/RESULTS.md, session 5). Pinning the concatenation to
    the strides eager PyTorch gives it (channels-last) makes those kernels plain streaming passes.
    The pass changes layouts only, never values."""
    from torch._inductor import inductor_prims  # noqa: F401  (registers prims.inductor_force_stride_order)
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    force_stride_order = torch.ops.prims.inductor_force_stride_order.default

    class ChannelsLastConcat(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            for node in list(graph.nodes):
                val = node.meta.get("val")
                if (node.target is not torch.ops.aten.cat.default or not isinstance(val, torch.Tensor)
                        or val.dim() != 4 or val.is_contiguous()
                        or not val.is_contiguous(memory_format=torch.channels_last)):
                    continue
                with graph.inserting_after(node):
                    pinned = graph.call_function(force_stride_order, (node, tuple(val.stride())))
                pinned.meta["val"] = val
                node.replace_all_uses_with(pinned, delete_user_cb=lambda user, pinned=pinned: user is not pinned)

        def uuid(self):  # inductor's cache key: this file's text
            return get_hash_for_files((__file__,))

    return ChannelsLastConcat()
