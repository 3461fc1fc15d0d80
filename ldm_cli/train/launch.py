"""`ldm train --gpus N`: re-run this command under accelerate's own launcher with N processes.

Nothing is launched by hand: `python -m accelerate.commands.launch --num_processes N -m ldm_cli ...`
is exactly what a user would type, and accelerate sets up the process group (NCCL on GPUs).
"""

import subprocess
import sys


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


def launch(gpus: int, mixed_precision: str, argv: list[str]) -> int:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus), "--num_machines", "1",
           "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
    if gpus > 1:
        cmd.append("--multi_gpu")
    cmd += ["-m", "ldm_cli", *without_option(argv, "--gpus")]
    return subprocess.call(cmd)
