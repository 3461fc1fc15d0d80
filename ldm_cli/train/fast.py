"""The training step's speed levers on CUDA, each measured in bench/train_step.py (docs/performance.md,
SD-1.5-shaped U-Net, 512px, bf16, batch 32 on one H200):

- fused AdamW (optim.py): one kernel for every parameter's update instead of foreach launches;
- pinned, asynchronous host-to-device copies of each step's latents, noise and timesteps (loss.py):
  a pageable copy waits for the queued GPU work, so the host could not run ahead (+2.6%);
- torch.compile: `full` compiles the whole U-Net as one graph (+33% over eager, 95 -> 126 images/s;
  ~150 s to compile cold, 164-196 s in channels_last on H100s, ~7-12 s from inductor's warm cache, so `auto`
  notes each step it compiled and compiles a noted step's shorter runs too: compile_key);
  `regional` compiles each repeated block (ResNet and transformer blocks) alone: measured slower to run
  (110 images/s) and not quicker to compile (174 s: ~20 distinct block shapes, each compiled forward and
  backward);
- channels_last, on for `full` with GroupNorm from per-channel statistics (accel/groupnorm.py): +8.2%
  (122.3 -> 132.3 images/s on an H100, one process; 0.9 GiB more; 1.06x the plain compiled loop side by side,
  its first 20 losses equal to eager's to 4 decimals). Alone it was level (125.6 vs 125.5): it
  spares cuDNN's convolutions their layout transposes (-20 ms a step) but inductor's NHWC GroupNorm and
  pointwise kernels took 19 ms more; from per-channel statistics they are back at NCHW's (52.9 against 69.5
  ms). Eager, off: 6% slower (89.3 vs 95.2: eager GroupNorm has no fast NHWC kernel). `regional` and `graphs`
  keep NCHW: not measured in the layout (graphs' small U-Nets are paced by the host, not their kernels);
- cuDNN's autotuning (torch.backends.cudnn.benchmark): measured no change, eager or compiled, so not set;
- `graphs`: `full` with CUDA graphs (torch.compile's reduce-overhead): each step's forward and backward
  replayed with one launch each, for steps the host cannot keep fed (small U-Nets at large batch, where
  Python's kernel launches outlast the GPU's work). One process, one micro-batch a step (graphs replay
  into fixed buffers: gradients kept across micro-batches or all-reduced by DDP mid-backward are not
  theirs to own); otherwise `full`. The embedded U-Net at batch 256: 51.7 -> 24.7 ms a step on an H200
  (2.1x; the GPU busy ~14 ms of it), 52-56 -> 16.5-17.7 ms on an H100 (3.2x; 1.06x at batch 1024), losses
  within bf16 noise of the eager step; its recipe's run (EMA, validation, checkpoints, resume) measured under
  it; with aspect-ratio buckets, DreamBooth's two forwards, textual inversion, LoRA and gradient checkpointing it
  trains as eager does (GPU tests). SD-1.5 at batch 32, GPU-bound: level with `full` (124.5 vs 124.1 images/s on
  an H100). So `auto` picks it for small U-Nets (under GRAPHS_MAX_PARAMS), where it pays, unless several processes
  or micro-batches; `full` for the rest.
On the CPU none applies: the CPU path stays bitwise as before (exact-resume tests run there).
"""

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path

import torch

from ldm_cli.accel.groupnorm import use_channel_stats
from ldm_cli.accel.inductor import compile_options

REGIONS = ("ResnetBlock2D", "BasicTransformerBlock")  # the U-Net's repeated blocks
COMPILE_MODES = ("auto", "none", "regional", "full", "graphs")
# the layout per --compile mode, SD-1.5 at batch 32: eager 6% slower in channels_last; `full` +8.2% with the
# GroupNorms below (level without them); `regional` and `graphs` not measured in it
CHANNELS_LAST = {"none": False, "regional": False, "full": True, "graphs": False}
# a compiled channels_last U-Net's GroupNorms from per-channel statistics (accel/groupnorm.py): inductor's NHWC
# GroupNorm and pointwise kernels 69.5 -> 52.9 ms a step (NCHW's: ~51), which is what makes the layout pay
GROUPNORM_BY_CHANNEL = True
# break-even of `full` against eager, SD-1.5 at batch 32, cold starts from the command: ~1,330 steps on an H200
# (131 s against 17 s; 251 against 337 ms a step), ~2,320 on an H100 whose host compiled twice as slowly; with a
# warm inductor cache ~140. (`regional` is fastest only in a ~170-step band, by under 1% on the H200: not chosen.)
# auto compiles for runs of at least this many steps:
AUTO_COMPILE_MIN_STEPS = 2000
# ... or of this many where this machine compiled the same step before (inductor's cache warm): a warm compiled
# start took 20-29 s from the command against eager's 17-19 s on H100s, SD-1.5 at batch 32, while each step is
# ~100 ms shorter (238 against ~340 ms; batch 8: 81 against ~150): paid back after 30-170 steps
WARM_COMPILE_MIN_STEPS = 200
# auto graphs U-Nets below this size: the embedded one (12M) steps 2.1-3.2x faster graphed; SD-1.5's (860M) level
GRAPHS_MAX_PARAMS = 100_000_000


def compile_mode(mode: str, device: torch.device, max_steps: int, world: int = 1, accumulation: int = 1,
                 small: bool = False, warm: bool = False) -> str:
    """`auto`: on CUDA for runs long enough to pay a compile back (a cold one; a `warm` one, the same step compiled
    on this machine before, sooner), `graphs` for a `small` U-Net (one whose step the host's launches pace), else
    `full`; none for shorter runs. `graphs` is `full` with more than one process or micro-batch a step. Off CUDA,
    none: the levers are CUDA's."""
    if device.type != "cuda":
        return "none"
    if mode == "auto":
        enough = max_steps >= (WARM_COMPILE_MIN_STEPS if warm else AUTO_COMPILE_MIN_STEPS)
        mode = "graphs" if enough and small else "full" if enough else "none"
    if mode == "graphs" and (world > 1 or accumulation > 1):
        return "full"
    return mode


def chosen_compile(cfg, device, max_steps: int, world: int, say, unet_params: int, key_of=None) -> str:
    """The --compile mode this run gets (compile_mode's rule), said in one line where `auto` chose it or where it
    is not the one asked for. key_of(mode): the compile_key of this run's step under `mode` (None: not known), for
    `auto` to compile a shorter run whose step this machine compiled before."""
    small = unet_params < GRAPHS_MAX_PARAMS  # LoRA and gradient checkpointing too: both train graphed as eager
    accumulation = cfg.gradient_accumulation
    long_run = compile_mode("auto", device, AUTO_COMPILE_MIN_STEPS, world, accumulation, small)  # what auto compiles
    warm = cfg.compile == "auto" and key_of is not None and long_run != "none" and compiled_before(key_of(long_run))
    compiled = compile_mode(cfg.compile, device, max_steps, world, accumulation, small, warm)
    why = (f"; graphs: a U-Net of {unet_params / 1e6:.0f}M parameters, whose steps CUDA graphs replay 2-3x faster"
           if compiled == "graphs" else "")
    other = "full or none" if compiled == "graphs" else "none" if compiled != "none" else "full"
    if cfg.compile == "auto" and device.type == "cuda" and warm and compiled != "none":
        say(f"--compile auto: {compiled} for {max_steps} steps (this step was compiled on this machine before: from "
            f"inductor's cache it starts in seconds and pays back after ~{WARM_COMPILE_MIN_STEPS} steps{why}; "
            f"--compile {other} to choose otherwise)")
    elif cfg.compile == "auto" and device.type == "cuda":
        enough = max_steps >= AUTO_COMPILE_MIN_STEPS
        say(f"--compile auto: {compiled} for {max_steps} steps ({'at least' if enough else 'fewer than'} "
            f"{AUTO_COMPILE_MIN_STEPS}, where a first compile, ~2-3.5 min for SD-1.5, pays back{why}; "
            f"--compile {other} to choose otherwise)")
    elif compiled == "none" and cfg.compile not in ("auto", "none"):
        say(f"--compile {cfg.compile} applies on CUDA only: this run on {device.type} is not compiled")
    elif compiled != cfg.compile and cfg.compile == "graphs":
        say("--compile graphs needs one process and one micro-batch a step: compiling full instead")
    return compiled


def step_settings(cfg, world: int, shapes: set) -> dict:
    """What, beside the U-Net and the mode, shapes a run's compiled graphs (compile_key's `settings`): the data's
    image shapes (None: the --resolution square), the batch, precision, what trains, checkpointing, processes."""
    return {"resolution": cfg.resolution, "shapes": sorted(map(str, shapes)), "batch_size": cfg.batch_size,
            "mixed_precision": cfg.mixed_precision, "lora": [cfg.lora_rank, cfg.lora_alpha],
            "textual_inversion": [bool(cfg.textual_inversion), cfg.vectors], "dreambooth": bool(cfg.class_data),
            "checkpointing": [cfg.gradient_checkpointing, cfg.selective_checkpointing],
            "accumulation": cfg.gradient_accumulation, "world": world}


def compile_key(mode: str, unet_config: dict, settings: dict, device: torch.device) -> str:
    """A name for the step a compiled run compiles: its mode, the U-Net's config, the `settings` that shape the
    compiled graphs (batch, data shapes, precision, LoRA, checkpointing, processes...), the GPU and the versions
    of torch, diffusers and ldm. Equal names: inductor's cache holds that step's kernels once one run compiled it."""
    import diffusers

    from ldm_cli import __version__

    # not diffusers' bookkeeping (`_name_or_path`, `_use_default_values`: a path, and a list in set order, which
    # varies from process to process)
    config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    named = {"mode": mode, "unet": config, **settings, "gpu": torch.cuda.get_device_name(device),
             "torch": torch.__version__, "diffusers": diffusers.__version__, "ldm": __version__}
    return hashlib.sha256(json.dumps(named, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _compiled_mark(key: str) -> Path:
    """Inside inductor's own cache folder: clearing the cache clears what says it is warm."""
    try:  # a private module of torch's: where it moves, the folder ldm's CLI sets (runtime.py)
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:
        def cache_dir():
            return os.environ.get("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "torchinductor"))

    return Path(cache_dir()) / "ldm-compiled" / key


def compiled_before(key: str) -> bool:
    return _compiled_mark(key).exists()


def remember_compiled(key: str) -> None:
    """Note that the step `key` names is compiled (after its first step). A note that cannot be written only
    costs a later short run its compile."""
    mark = _compiled_mark(key)
    with suppress(OSError):
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.touch()


def speed_up(unet, mode: str, device: torch.device, channels_last: bool | None = None) -> None:
    """Apply the CUDA levers to the U-Net to train, in place (nothing on other devices). channels_last:
    None takes CHANNELS_LAST's choice for the mode."""
    if device.type != "cuda":
        return
    if channels_last is None:
        channels_last = CHANNELS_LAST[mode]
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if GROUPNORM_BY_CHANNEL and channels_last and mode != "none":
        use_channel_stats(unet)
    options = {"options": compile_options()} if channels_last else {}
    if mode == "regional":
        for m in unet.modules():
            if type(m).__name__ in REGIONS:
                m.compile(**options)
    elif mode == "full":
        unet.compile(**options)
    elif mode == "graphs":
        unet.compile(**({"options": {**compile_options(), "triton.cudagraphs": True}} if channels_last
                        else {"mode": "reduce-overhead"}))


def step_begins(mode: str) -> None:
    """Tell CUDA graphs a new step begins: the last step's outputs (its loss, its gradients) are done with,
    so their buffers may be replayed into."""
    if mode == "graphs":
        torch.compiler.cudagraph_mark_step_begin()


@contextmanager
def compile_limits(memory_budget: float = 1.0):
    """Room for one compiled graph per distinct block shape (SD's U-Net has ~20): dynamo's default of 8
    per code object would drop the rest back to eager. memory_budget: the share of the activations the
    compiled backward may keep (train/recompute.py; 1.0, the partitioner's default, keeps what it chooses)."""
    import torch._dynamo
    import torch._functorch.config

    with (torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=1024),
          torch._functorch.config.patch(activation_memory_budget=memory_budget)):
        yield
