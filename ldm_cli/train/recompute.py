"""Gradient checkpointing: which of the U-Net's activations the backward pass recomputes.

`--gradient-checkpointing` keeps only each block's inputs and reruns the whole block in the backward pass
(diffusers' own, through torch.utils.checkpoint): the least memory, one more forward's time.

`--selective-checkpointing` reruns only what is cheap to rerun (Korthikanti et al. 2022's selective
recomputation; torch's selective activation checkpointing): inside each block the outputs of the convolutions,
matmuls and attention, the operations that hold the FLOPs, are kept, and the GroupNorms, activations, additions
and casts between them are recomputed from them. Those bandwidth-bound operations' outputs are about half of the
U-Net's activations or more (bench/checkpointing_memory.py, bf16 autocast, CPU: SD-1.5-shaped at batch 1, 2,501 MiB
held after the forward without checkpointing, 801 MiB selective, 358 MiB with all of it recomputed; at half
width and batch 2, 1,303 / 645 / 202), while rerunning them costs a fraction of a forward. Same values as
without checkpointing: the same operations on the same inputs (tests). Under torch.compile the compiler already
recomputes cheap operations on its own, and that op policy kept 994 of the compiled U-Net's 1,126 MiB (half
width): there selective checkpointing is instead the compiler's activation memory budget (MEMORY_BUDGET), which
kept 649 of 1,136.
On a GPU (bench/train_step.py --part memory, SD-1.5 at batch 32, one H100) the eager op policy's step took as long
as with all of it recomputed (68.7 against 69.5 images/s; none 88.2) while keeping more (32.0 against 19.1
GiB; none 49.8), most likely paced by the host: torch runs every operation of a checkpointed block through a Python
dispatch mode, forward and rerun (260 against 201 ms a step of host work, bench/checkpointing_memory.py --host;
the GPU's busy share not measured). Compiled, the budget's step ran 115.5 images/s at 29.0 GiB (none: 132.5 at
36.8). So eager on CUDA the run says to prefer --gradient-checkpointing or --compile full (eager_note).
"""

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_KEPT_NAMES = ("convolution.default", "mm.default", "addmm.default", "bmm.default", "baddbmm.default",
               "_scaled_dot_product_flash_attention.default", "_scaled_dot_product_efficient_attention.default",
               "_scaled_dot_product_cudnn_attention.default", "_scaled_dot_product_flash_attention_for_cpu.default")


def _op(name: str):
    packet, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, packet, None), overload, None)


KEPT = frozenset(op for op in map(_op, _KEPT_NAMES) if op is not None)  # the ops a torch build lacks left out


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEPT else CheckpointPolicy.PREFER_RECOMPUTE


def selective(module, *args):
    """diffusers' gradient_checkpointing_func: module(*args), keeping only the KEPT operations' outputs."""
    return checkpoint(module.__call__, *args, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, _policy))


def enable(unet, gradient_checkpointing: bool, selective_checkpointing: bool, compiled: bool = False) -> None:
    """Turn on the U-Net's checkpointing as asked (neither: nothing). A compiled U-Net's selective checkpointing is
    the compiler's (compiled_budget), not the op policy, which the compiler keeps most of (see the module's doc)."""
    if selective_checkpointing and not compiled:
        unet.enable_gradient_checkpointing(selective)
    elif gradient_checkpointing:
        unet.enable_gradient_checkpointing()


# Selective checkpointing under torch.compile: AOTAutograd's min-cut partitioner keeps at most this share of what it
# would save for the backward, and recomputes the cheapest of the rest (an SD-1.5-shaped U-Net at half width, CPU:
# 1,126 MiB held after the compiled forward at 1.0, 653 MiB at 0.5, 568 at 0.2; the op policy above kept 994).
MEMORY_BUDGET = 0.5


def eager_note(selective_checkpointing: bool, compiled: bool, device) -> str | None:
    """One line for a run whose selective checkpointing is the eager op policy on CUDA, where it measured no gain
    over --gradient-checkpointing (the module's doc); None for every other run (a CPU's speed is unmeasured)."""
    if not selective_checkpointing or compiled or device.type != "cuda":
        return None
    return ("note: --selective-checkpointing without a compiled step measured as slow as --gradient-checkpointing "
            "on an H100, keeping more (SD-1.5 at batch 32: 68.7 against 69.5 images/s, 32.0 against 19.1 GiB); "
            "with --compile full it ran 115.5 images/s at 29.0 GiB")


def compiled_budget(selective_checkpointing: bool) -> float:
    """torch._functorch.config.activation_memory_budget for a compiled step (1.0: the partitioner's default)."""
    return MEMORY_BUDGET if selective_checkpointing else 1.0
