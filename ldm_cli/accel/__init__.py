"""GPU speed: builds the U-Net runner once (plain, CUDA-graphed, or compiled under CUDA graphs) and
changes the modules' layouts for it. Nothing here sets global torch flags: `runtime.configure_torch`
(called by the CLI) does, before loading.
"""

import torch

from ldm_cli.accel.graphs import GraphedUNet
from ldm_cli.accel.inductor import compile_options
from ldm_cli.accel.projections import group_shared_input_projections
from ldm_cli.errors import check
from ldm_cli.models.components import Components
from ldm_cli.models.options import ACCEL_MODES
from ldm_cli.models.unet import plain_runner


def build_runner(c: Components, mode: str = "auto", channels_last: bool | None = None,
                 fuse_qkv: bool = True, group_projections: bool | None = None):
    """The U-Net runner `f(x, t, context)` for `c` on its device, built once: the plain one on CPU (where
    `auto` means `none`) or with `none`; on CUDA a CUDA-graphed one, compiled first with `compile`.
    Changes c's modules in place for it (layouts, fused projections, the compiled VAE decoder).
    channels_last=None: on with compile (inductor writes NHWC GroupNorm kernels that eager PyTorch
    lacks), off otherwise. group_projections=None: on with compile, see group_shared_input_projections."""
    check(mode in ACCEL_MODES, f"--accel must be one of {', '.join(ACCEL_MODES)}, got {mode!r}")
    if c.device.type != "cuda" or mode == "none":
        check(mode in ("auto", "none"), f"--accel {mode} needs a CUDA device")
        return plain_runner(c)
    # channels_last is off in eager modes: on an H100 it made batch 8 slower (GroupNorm's NHWC kernels are
    # slow in eager PyTorch), see docs/performance.md.
    if channels_last if channels_last is not None else mode == "compile":
        c.unet.to(memory_format=torch.channels_last)
        c.vae.to(memory_format=torch.channels_last)
    if fuse_qkv and hasattr(c.unet, "fuse_qkv_projections"):
        c.unet.fuse_qkv_projections()  # one (3x wider) matmul instead of three for q, k, v
    # Its probe forward costs ~1 s in a fresh process (every kernel's first use) for ~5 ms per image
    # uncompiled, ~8 ms compiled (docs/performance.md): worth it where the process is long anyway.
    if group_projections if group_projections is not None else mode == "compile":
        group_shared_input_projections(c.unet)
    unet = c.unet
    if mode == "compile":
        options = compile_options()
        unet = torch.compile(c.unet, fullgraph=True, dynamic=False, options=options)
        # The decoder module, not vae.decode: tiled decoding calls it once per (same-sized) tile.
        c.vae.decoder = torch.compile(c.vae.decoder, fullgraph=True, dynamic=False, options=options)
    return GraphedUNet(unet)
