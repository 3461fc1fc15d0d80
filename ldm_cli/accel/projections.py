"""The U-Net's linear layers that share an input, run as one matmul per group."""

import torch
import torch.nn.functional as F


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
