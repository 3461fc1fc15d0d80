"""torch.compile settings for the U-Net and VAE decoder, and our one inductor graph pass."""

import torch


def compile_options() -> dict:
    """Inductor settings for torch.compile(options=...), local to our compiled modules (no global
    config is changed): from PyTorch's "Diffusion, Fast" recipe, those that cost no compile time: 1x1
    convolutions as matmuls (fusable with their neighbours), and no epilogue fusion into matmul
    templates. Its coordinate-descent tuning of Triton block sizes is left off: on an H100 the first
    compile at batch 1 had not finished after 400 s (docs/performance.md). Plus our one graph pass."""
    return {"conv_1x1_as_mm": True, "epilogue_fusion": False,
            "post_grad_custom_post_pass": channels_last_concat_pass()}


def channels_last_concat_pass():
    """An inductor graph pass that keeps every channels-last 4-D concatenation channels-last.

    Why: the U-Net's up blocks concatenate the upsampled features with the skip connection
    (`torch.cat(dim=1)`) and feed the result to GroupNorm and a convolution, all channels-last. Inductor
    (torch 2.11) writes that concatenation out in the default NCHW layout, so the next kernel (GroupNorm
    apply + SiLU, writing channels-last for the convolution) reads it transposed at ~0.5 TB/s: 1.8 ms of
    a 35 ms batch-16 U-Net call on an H100 (docs/performance.md). Pinning the concatenation to
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
