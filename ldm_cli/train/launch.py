"""`ldm train --gpus N` and `ldm sample --gpus N`: re-run this command under accelerate's own launcher with N
processes.

Nothing is launched by hand: `python -m accelerate.commands.launch --num_processes N -m ldm_cli ...`
is exactly what a user would type, and accelerate sets up the process group (NCCL on GPUs, gloo for CPU
processes). What the processes print passes through, each `ldm:` line once (every process finds the same bad
input); the launcher's own report of a failed process (torchrun's log lines and traceback, after the process
has said why in one line) is left out.
"""

import re
import subprocess
import sys

LAUNCHER_FAILED = re.compile(r"^[EWI]\d{4} .*torch/distributed/elastic")


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

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus), "--num_machines", "1",
           "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
    if gpus > 1:
        cmd.append("--multi_gpu")
    cmd += [*shlex.split(extra), "-m", "ldm_cli", *without_option(without_option(argv, "--gpus"), "--launch")]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1)
    said, failed = set(), False
    for line in proc.stderr:
        failed = failed or bool(LAUNCHER_FAILED.match(line))
        if failed or (line.startswith("ldm: ") and line in said):
            continue
        said.add(line)
        sys.stderr.write(line)
    return proc.wait()
