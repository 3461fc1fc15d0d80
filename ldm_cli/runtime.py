"""Process-wide side effects, in one place, called by `cli.main` only: library verbosity, thread
counts, torch flags, signal handling, and where ldm's warnings go. Library code never calls these; a
program using ldm as a library sets up what it wants itself (bench/ scripts call `setup`).
"""

import logging
import os
import signal
import sys
import warnings

from ldm_cli.io.files import cache_root


def quiet_environment() -> None:
    """Before diffusers/transformers are imported: what they print at import time comes too early for
    their set_verbosity functions. ldm has its own output."""
    for name, value in (("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"),
                        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(name, value)


def quiet_libraries() -> None:
    """diffusers/transformers print progress bars and advice on every load and save, and log as errors
    what ldm then reports itself, in one line (a LoRA that does not fit): only critical lines pass."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity(logging.CRITICAL)
        lib.utils.logging.disable_progress_bar()


class _ToStderr(logging.StreamHandler):
    """A handler writing to sys.stderr as it is at each record, not as it was when the handler was made: a
    program (or a test) that redirects stderr after `setup` still gets ldm's lines."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def report_warnings(quiet: bool = False) -> None:
    """ldm's own notes and warnings (the `ldm` logger) go to stderr as `ldm: ...` lines."""
    log = logging.getLogger("ldm")
    if not any(getattr(h, "ldm_cli", False) for h in log.handlers):
        handler = _ToStderr()
        handler.setFormatter(logging.Formatter("ldm: %(message)s"))
        handler.ldm_cli = True
        log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)  # -q: no notes, warnings still
    log.propagate = False


def configure_torch(accel: str = "auto") -> None:
    """Torch flags for a CUDA run with this --accel mode; nothing on CPU."""
    import torch

    if not torch.cuda.is_available() or accel == "none":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    # cuDNN autotuning tries every algorithm for each new conv shape: seconds at start-up, which a
    # one-image run never earns back. Worth it only where the process is long anyway (compile).
    torch.backends.cudnn.benchmark = accel == "compile"
    if accel == "compile":
        keep_compile_cache()


def keep_compile_cache() -> None:
    """Inductor's caches on disk, under ldm's cache folder (torch's default is /tmp, emptied at a reboot):
    a second process compiles from cache, not from scratch (a compiled SD-1.5 training step: ~30 s to its
    first step instead of ~260 s, docs/performance.md). A user's own TORCHINDUCTOR_* settings win."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


_INTERRUPT = {"interrupted": False}


def exiting() -> None:
    """Once interrupted, further Ctrl-Cs while the process exits are ignored (Python's shutdown would
    otherwise let one kill the process by signal, losing its exit code)."""
    if _INTERRUPT["interrupted"]:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


def leave(code: int) -> None:
    """Exit with `code`. One of several processes under accelerate's launcher leaves without the interpreter's
    teardown: torch's gloo threads can still hold a finished collective's tensors then, and freeing one while
    Python shuts down aborts the process ("terminate called without an active exception"), so the launcher
    fails a run whose every file was written. By now each file is written and closed; the output streams are
    flushed here."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said on it
            pass
    os._exit(code)


def handle_interrupts() -> None:
    """Ctrl-C (SIGINT) and SIGTERM (a scheduler's stop, `kill`) raise KeyboardInterrupt once: training
    then saves a checkpoint and exits, sampling says what it wrote. A second one while that is under
    way is said and ignored, so it cannot cut the save short (Ctrl-\\ still quits at once)."""
    state = _INTERRUPT

    def handler(signum, frame):
        if state["interrupted"]:
            print("ldm: still stopping (saving what was done); Ctrl-\\ quits at once", file=sys.stderr)
            return
        state["interrupted"] = True
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        pass


def setup(quiet: bool = False, debug: bool = False, libraries: bool = True) -> None:
    """Everything above that does not depend on the command (torch flags come with the model).
    libraries=False leaves diffusers/transformers unimported (2-3 s): the CLI quiets them in each command
    that loads a model, so that --help and bad input answer at once."""
    if not debug:  # libraries' Python warnings (peft, diffusers, torch) are not ldm's output
        warnings.simplefilter("ignore")
    quiet_environment()
    report_warnings(quiet)
    if libraries:
        quiet_libraries()
    handle_interrupts()
