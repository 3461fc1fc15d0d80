"""The loss log: losses stay on the device between flushes (no host sync every step); each flush
reads them back at once, appends JSON lines to OUT/log.jsonl and reports them to `on_log`.
images_per_s is the rate since the previous flush (the first one's window holds the compile and warm-up):
a running average since the start would hide the steady rate behind minutes of compiling.
first_step_note: the line that says how long the first step took to come, and where the time went."""

import json
import time
from pathlib import Path

import torch

from ldm_cli.train.checkpoints import WRITE_ERRORS, write_failed


class LossLog:
    def __init__(self, path: Path, main_process: bool, max_steps: int, on_log=None):
        self.path, self.max_steps, self.on_log = path, max_steps, on_log
        self.file = open(path, "a") if main_process else None
        self.pending: list[tuple[int, torch.Tensor, float]] = []  # (step, loss on the device, lr)
        self.t_start = self.t_last = time.perf_counter()
        self.images = 0  # since the last flush

    def add(self, step: int, loss: torch.Tensor, lr: float, images: int) -> None:
        self.pending.append((step, loss, lr))
        self.images += images

    def flush(self) -> None:
        if not self.pending:
            return
        values = torch.stack([loss for _, loss, _ in self.pending]).float().cpu().tolist()  # one sync per flush
        now = time.perf_counter()
        rate = round(self.images / (now - self.t_last), 3) if now > self.t_last else None
        records = [{"step": step, "loss": value, "lr": lr, "elapsed_s": round(now - self.t_start, 3),
                    "images_per_s": rate} for (step, _, lr), value in zip(self.pending, values)]
        self.pending.clear()
        self.t_last, self.images = now, 0
        if self.file is None:
            return
        try:
            self.file.write("".join(json.dumps(r) + "\n" for r in records))
            self.file.flush()
        except WRITE_ERRORS as e:
            raise write_failed(self.path, e) from None
        if self.on_log is not None:
            for r in records:
                self.on_log(r, self.max_steps)

    def record(self, record: dict) -> None:
        """Another line of the log (the validation loss), after the pending losses."""
        self.flush()
        if self.file is None:
            return
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except WRITE_ERRORS as e:
            raise write_failed(self.path, e) from None

    def close(self) -> None:
        self.flush()
        if self.file is not None:
            self.file.close()


def first_step_note(marks: dict[str, float], compiled: str, device) -> str:
    """The time to the first step from train()'s start and from the process's (what a user of the command
    waits: the imports count), and each phase's share: marks are the phases' ends, in order; the step
    (with its compilation) ends now."""
    import psutil  # accelerate's dependency

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ends = [*marks.values(), time.perf_counter()]
    names = [*list(marks)[1:], "the step"]
    phases = ", ".join(f"{n} {b - a:.1f} s" for n, a, b in zip(names, ends, ends[1:]))
    process = time.time() - psutil.Process().create_time()
    return (f"first step done {ends[-1] - ends[0]:.1f} s after the start, {process:.1f} s after the command "
            f"(compile: {compiled}; {phases})")
