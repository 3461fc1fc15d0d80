"""`ldm train --gpus N` and `ldm sample --gpus N`: re-run this command under accelerate's own launcher with N
processes.

Nothing is launched by hand: `python -m accelerate.commands.launch --num_processes N -m ldm_cli ...`
is exactly what a user would type, and accelerate sets up the process group (NCCL on GPUs, gloo for CPU
processes). What the processes print passes through, each `ldm:` line once (every process finds the same bad
input); the launcher's own report of a failed process (torchrun's log lines and traceback, after the process
has said why in one line) is left out. Interrupted, it waits for the processes to save and say so. A process
that dies without a word (a signal: killed, a crash in native code, the system's out-of-memory killer) is named
in one `ldm:` line; `--debug` passes the launcher's report.
"""

import os
import re
import signal
import subprocess
import sys

LAUNCHER_FAILED = re.compile(r"^[EWI]\d{4} .*torch/distributed/elastic")
PROCESS_FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)")  # torchrun's first report
# After a stop (Ctrl-C, SIGTERM), torchrun kills the processes that are still running this many seconds later; its
# own default, 30 s, cut the checkpoint a stopped run writes (SD-1.5's full fine-tune with AdamW and EMA ~14 GB,
# SDXL's ~42 GB: minutes on a slow disk). A TORCH_ELASTIC_SHUTDOWN_TIMEOUT of the user's own is kept.
SHUTDOWN_S = 900


def without_option(argv: list[str], name: str) -> list[str]:
    """argv less `name VALUE` and `name=VALUE`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def check_launch(gpus: int, device: str, extra: str) -> None:
    """Before launching: enough GPUs (or CPU processes: --device cpu, gloo, how the tests run it), and
    launcher options that split as a shell would split them."""
    import shlex

    import torch

    from ldm_cli.errors import LdmError

    try:
        shlex.split(extra)
    except ValueError as e:
        raise LdmError(f"--launch {extra!r}: {e}; quote it as one shell word") from None
    found = torch.cuda.device_count()
    if found < gpus and device != "cpu":
        raise LdmError(f"--gpus {gpus}: this machine has {found} CUDA GPU(s); use --gpus {max(found, 1)}"
                       + (" (or --device cpu for CPU processes)" if not found else ""))


def launch(gpus: int, mixed_precision: str, argv: list[str], extra: str = "") -> int:
    """Run argv (less --gpus/--launch) under accelerate's launcher; `extra`: more launcher options (the last of
    an option given twice wins, so `--launch '--num_machines 2 ...'` overrides the one-machine defaults)."""
    import shlex

    options = ["--num_processes", str(gpus), "--num_machines", "1", "--mixed_precision", mixed_precision,
               "--dynamo_backend", "no", *(["--multi_gpu"] if gpus > 1 else []), *shlex.split(extra)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *options, "-m", "ldm_cli",
           *without_option(without_option(argv, "--gpus"), "--launch")]
    env = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(SHUTDOWN_S), **os.environ}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1, env=env)
    said, died, interrupted = relay(proc, debug="--debug" in argv)
    code = proc.wait()
    if not any(line.startswith("ldm: error:") for line in said):
        if interrupted:
            print("ldm: interrupted", file=sys.stderr)
        elif code and died and int(died[1]) < 0:
            print(f"ldm: error: {signal_death(-int(died[1]), f'process {died[2]} of {processes(options)}')}",
                  file=sys.stderr)
        elif code < 0:  # the launcher itself
            print("ldm: error: " + signal_death(-code, "accelerate's launcher"), file=sys.stderr)
    if interrupted:
        return 130
    return 1 if code < 0 else code  # failed work, not a shell's 128 + signal


def relay(proc, debug: bool):
    """Pass the launched processes' stderr through until they are all gone: each `ldm:` line once, the
    launcher's own report of a failure left out (all of it with `debug`), and with it what the processes it
    then stops say, unless the stop is the user's: a Ctrl-C (or a SIGTERM to the process group) reaches the
    launcher too, which stops the processes; they save what they did and the first one says so. Here the
    signal is only noted: an exception in the middle of reading would lose what was read but not yet decoded
    (the processes' last lines). Returns (the lines said, torchrun's first failure report, interrupted)."""
    said, failed, died, signals = set(), False, None, []
    held = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in held:
        signal.signal(sig, lambda signum, frame: signals.append(signum))
    try:
        for line in proc.stderr:
            failed = failed or bool(LAUNCHER_FAILED.match(line))
            died = died or PROCESS_FAILED.search(line)
            ours = line.startswith("ldm: ")
            if not debug and ((failed and not (ours and signals)) or (ours and line in said)):
                continue
            said.add(line)
            sys.stderr.write(line)
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)
    return said, died, bool(signals)


def processes(options: list[str]) -> str:
    """The launcher's --num_processes (the last one given, as its parser takes it)."""
    found = ""
    for i, o in enumerate(options):
        if o == "--num_processes" and i + 1 < len(options):
            found = options[i + 1]
        elif o.startswith("--num_processes="):
            found = o.split("=", 1)[1]
    return found


def signal_death(signum: int, who: str) -> str:
    """What to say of a process ended by a signal: it had no chance to say why itself."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    return (f"{who} on this machine ended by {name} (killed, out of memory, or a crash in native code); the "
            "images and checkpoints written so far are whole; --debug shows the launcher's report")
