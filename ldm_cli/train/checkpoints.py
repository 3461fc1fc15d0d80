"""Training checkpoints: written atomically, verified on load.

A checkpoint is a folder `step-NNNNNNN/` holding
  trainable.safetensors   the trained tensors (the whole U-Net, or only the LoRA adapters)
  ema.safetensors         their exponential moving average, with --ema
  state.pt                optimizer, lr scheduler, grad scaler and step (tensors and numbers only)
  config.json             the TrainConfig and the U-Net config, for the record and for --from-scratch rebuilds
  manifest.json           size and BLAKE2 digest of every file above (of its 64 MiB pieces), written last
It is built in a hidden temp folder and renamed into place, so a kill at any moment leaves either
the whole checkpoint or none. A checkpoint whose files do not match its manifest (a disk that lied,
a copy cut short) is skipped with a warning and the one before it is used.
Speed (SD-1.5's full fine-tune, ~10 GB, bench/checkpoint_speed.py): the files are digested in 64 MiB pieces,
all in parallel (hashlib lets go of the GIL), a checkpoint verified once in a process is not read again
for it (`--resume latest` finds it, then loads it), and state.pt is written without torch's own CRC-32 of
each record, which the manifest's digest of every byte makes redundant.
"""

import hashlib
import json
import logging
import os
import shutil
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ldm_cli.errors import LdmError, check
from ldm_cli.io.files import atomic_folder, remove_folder

log = logging.getLogger("ldm")
MANIFEST = "manifest.json"
# What a failed write raises: safetensors reports a full disk as its own error type, not OSError.
WRITE_ERRORS = (OSError, SafetensorError)


class WriteFailed(LdmError):
    """A checkpoint or output could not be written: trying again to save would fail the same way."""


def write_failed(what: Path, e: Exception) -> LdmError:
    """The one-line error for a write that failed (disk full, quota, permissions)."""
    reason = getattr(e, "strerror", None) or str(e).removeprefix("Error while serializing: ")
    return WriteFailed(f"{what}: cannot write ({reason}); the last checkpoint is intact: free some space and "
                    "continue with --resume latest", 1)


class _WriteRecorder:
    """A file for torch.save that keeps the OSError of a failed write: torch reports a full disk only as
    its own RuntimeError ("unexpected pos ..."), which would read as a bug."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_torch(obj, path: Path) -> None:
    """torch.save(obj, path), a failed write raised as the OSError it is."""
    with open(path, "wb") as f:
        recorder = _WriteRecorder(f)
        try:
            with _no_record_crc():
                torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error is not None:
                raise recorder.error from None
            raise


def _no_record_crc():
    """torch.save without a CRC-32 of each zip record (1.3 s per 2 GiB on one CPU core), restored after;
    torch.load reads such files (they hold no CRC to check). A no-op on a torch without the setting."""
    config = getattr(getattr(torch.utils, "serialization", None), "config", None)
    if config is None or not hasattr(config.save, "compute_crc32"):
        return nullcontext()
    return config.patch({"save.compute_crc32": False})


PIECE = 64 << 20  # bytes: files are digested in pieces this size, a checkpoint's pieces all in parallel
DIGEST = "blake2b-pieces"  # the manifest's key: BLAKE2b of the BLAKE2b digests of a file's pieces, in order
WHOLE_DIGEST = "blake2b"  # the key of checkpoints written before: BLAKE2b of the whole file (still verified)


def _hash_range(path: Path, start: int, stop: int) -> bytes:
    """BLAKE2b (16 bytes) of path's bytes [start, stop)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        f.seek(start)
        while start < stop:
            block = f.read(min(1 << 22, stop - start))  # blocks over 2 KiB are hashed with the GIL let go
            if not block:
                break
            h.update(block)
            start += len(block)
    return h.digest()


def _digest(path: Path) -> str:
    """A whole file's BLAKE2b, one core reading it start to end (WHOLE_DIGEST: the manifests written before)."""
    return _hash_range(path, 0, path.stat().st_size).hex()


def _digests(paths: list[Path]) -> list[str]:
    """Each file's DIGEST: its PIECE-sized pieces hashed in parallel threads (hashlib lets go of the GIL; ~1 GB/s a
    core), then the pieces' digests hashed in order. A tree of depth one, so a 6 GiB state.pt is not one core's
    6 s: the machine's cores share every file's pieces."""
    pieces = [(p, start, min(start + PIECE, size)) for p in paths
              for size in [p.stat().st_size] for start in range(0, max(size, 1), PIECE)]
    with ThreadPoolExecutor(max(1, min(len(pieces), _cores()))) as pool:
        digests = list(pool.map(lambda piece: _hash_range(*piece), pieces))
    tops = {p: hashlib.blake2b(digest_size=16) for p in paths}
    for (p, _, _), d in zip(pieces, digests):
        tops[p].update(d)
    return [tops[p].hexdigest() for p in paths]


def _whole_digests(paths: list[Path]) -> list[str]:
    """_digest of each file, the files in parallel."""
    with ThreadPoolExecutor(max(1, min(len(paths), _cores()))) as pool:
        return list(pool.map(_digest, paths))


def _cores() -> int:
    """The CPU cores this process may run on (a container's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _signature(ckpt: Path, names) -> tuple:
    """What a file's rewrite would change: each one's size and modification time, and the manifest's."""
    return tuple((n, (ckpt / n).stat().st_size, (ckpt / n).stat().st_mtime_ns) for n in (*names, MANIFEST))


_verified: dict[Path, tuple] = {}  # checkpoints verified in this process -> their files' signature then


def save_checkpoint(root: Path, step: int, trainable: dict, ema: dict | None, state: dict, config: dict,
                    keep: int) -> Path:
    """Write checkpoint `step` under root atomically; then delete all but the newest `keep`."""
    final = root / f"step-{step:07d}"
    if final.exists():  # the same step saved twice (a resumed run that stopped on it): keep the first
        return final
    try:
        with atomic_folder(final, tag=f"step-{step:07d}") as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, tmp / "trainable.safetensors")
            if ema is not None:
                save_file({k: v.detach().contiguous().cpu() for k, v in ema.items()}, tmp / "ema.safetensors")
            save_torch(state, tmp / "state.pt")
            (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
            paths = sorted(tmp.iterdir())
            files = {p.name: {"bytes": p.stat().st_size, DIGEST: d} for p, d in zip(paths, _digests(paths))}
            (tmp / MANIFEST).write_text(json.dumps(files, indent=2))
    except WRITE_ERRORS as e:
        raise write_failed(final, e) from None
    for old in checkpoints(root)[:-keep]:
        remove_folder(old)
    return final


def host_copy(obj):
    """obj with every tensor copied to the host (nested dicts, lists and tuples): what training goes on changing
    in place (weights, EMA, optimizer moments) is frozen as it is now."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return obj  # numbers, strings, None: never changed in place


def tensor_bytes(obj) -> int:
    """The bytes of every tensor in obj (nested as host_copy walks it)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


CGROUP_MEMORY = (("sys/fs/cgroup/memory.max", "sys/fs/cgroup/memory.current"),  # v2, then v1
                 ("sys/fs/cgroup/memory/memory.limit_in_bytes", "sys/fs/cgroup/memory/memory.usage_in_bytes"))


def available_memory(root: Path = Path("/")) -> int:
    """The host memory this process can still take without swapping or being killed: Linux's MemAvailable, or
    less where its cgroup (a container's limit) leaves less (limit - usage: its page cache counted as used,
    so on the safe side); 0 where it cannot be read (then nothing is written in the background)."""
    free = 0
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return 0
    for limit_file, usage_file in CGROUP_MEMORY:
        try:
            limit, usage = (root / limit_file).read_text().strip(), int((root / usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit():  # v2 says "max" for none
            free = min(free, int(limit) - usage)
    return max(free, 0)


class Writer:
    """Checkpoints, written one at a time. `save(..., background=True)`: the tensors are copied to the host and
    written by a thread while training goes on (an SD-1.5 checkpoint, ~10 GB, held the loop 15-37 s on a 2-core
    machine's disk; half SD-1.5's width, 2.4 GB: 7.8 s, 0.66 s in the background; bench/checkpoint_speed.py);
    only when that copy fits in half the available host memory,
    else as before. A write that failed is raised by the next save, by `poll()` (each step) or by `wait()`."""

    def __init__(self):
        self._pool, self._pending = None, None

    def save(self, root: Path, step: int, trainable: dict, ema: dict | None, state: dict, config: dict, keep: int,
             background: bool = False) -> Path:
        self.wait()
        tensors = (trainable, ema, state)
        if background and 2 * tensor_bytes(tensors) < available_memory():
            trainable, ema, state = host_copy(tensors)
            self._pool = self._pool or ThreadPoolExecutor(1, thread_name_prefix="ldm-checkpoint")
            self._pending = self._pool.submit(save_checkpoint, root, step, trainable, ema, state, config, keep)
            return root / f"step-{step:07d}"
        with uninterrupted():  # a Ctrl-C during a save is delivered after it
            return save_checkpoint(root, step, trainable, ema, state, config, keep)

    def poll(self) -> None:
        """Raise the failure of a background write that has ended in one (a full disk: stop now, not N steps on)."""
        if self._pending is not None and self._pending.done() and self._pending.exception() is not None:
            self.wait()

    def wait(self) -> None:
        """Finish the write in flight, if any (its failure raised here)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()


def checkpoints(root: Path) -> list[Path]:
    """Completed checkpoint folders, oldest first (temp folders are never listed)."""
    return sorted(p for p in root.glob("step-*") if p.is_dir())


def verify(ckpt: Path) -> str | None:
    """None if every file matches the manifest, else what is wrong."""
    try:
        files = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"no readable manifest ({type(e).__name__})"
    key = ckpt.resolve()
    try:
        signature = _signature(ckpt, files)
    except OSError:
        return f"{next((n for n in files if not (ckpt / n).is_file()), MANIFEST)} is missing"
    if _verified.get(key) == signature:  # verified in this process, nothing rewritten since
        return None
    for name, want in files.items():
        if not (ckpt / name).is_file() or (ckpt / name).stat().st_size != want["bytes"]:
            return f"{name} does not match the manifest"
    pieced = [n for n in files if DIGEST in files[n]]
    whole = [n for n in files if n not in pieced]  # a checkpoint written before DIGEST
    got = dict(zip(pieced, _digests([ckpt / n for n in pieced])))
    got.update(zip(whole, _whole_digests([ckpt / n for n in whole])))
    for name, want in files.items():
        if got[name] != want.get(DIGEST, want.get(WHOLE_DIGEST)):
            return f"{name} does not match the manifest"
    _verified[key] = signature
    return None


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint that verifies; damaged newer ones are reported on stderr and passed over."""
    for ckpt in reversed(checkpoints(root)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        log.warning(f"warning: {ckpt}: {problem}; using the one before it")
    return None


def load_checkpoint(ckpt: Path) -> tuple[dict, dict | None, dict]:
    """(trainable, ema or None, state) of a verified checkpoint."""
    problem = verify(ckpt)
    if problem is not None:
        raise LdmError(f"{ckpt}: damaged checkpoint ({problem}); pass an older one or --resume latest")
    ema = load_file(ckpt / "ema.safetensors") if (ckpt / "ema.safetensors").is_file() else None
    try:
        # tensors and numbers only: no code runs; onto the host, from which the optimizer's load_state_dict puts
        # each state on its parameter's device (a GPU's checkpoint, its tensors tagged cuda:0, resumes anywhere)
        state = torch.load(ckpt / "state.pt", weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 (torch's message would advise weights_only=False: never that)
        raise LdmError(f"{ckpt}: state.pt holds more than tensors and numbers, or is damaged "
                       f"({type(e).__name__}); it is not loaded: pass an older checkpoint") from None
    return load_file(ckpt / "trainable.safetensors"), ema, state


def find_resume(root: Path, resume: str | None) -> Path | None:
    """The checkpoint `--resume` names: None (no resume), `latest` (the newest that verifies), or a folder."""
    if not resume:
        return None
    if resume == "latest":
        found = latest_checkpoint(root)
        check(found is not None, f"--resume latest: no complete checkpoint in {root}")
        return found
    check(Path(resume).is_dir(), f"--resume {resume}: no such checkpoint folder")
    return Path(resume)


def named_step(ckpt: Path) -> int | None:
    """The step a checkpoint folder's name says it holds (`save_checkpoint` names it step-NNNNNNN), or None
    for a folder named otherwise; its state.pt, read on restore, is what counts."""
    name = ckpt.name.removeprefix("step-")
    return int(name) if name != ckpt.name and name.isdigit() else None


def saved_config(ckpt: Path) -> dict:
    """The TrainConfig a checkpoint was saved with (as a dict), or {} if it has none."""
    try:
        return json.loads((ckpt / "config.json").read_text()).get("train", {})
    except (OSError, ValueError, AttributeError):
        return {}


def clean_stale(root: Path) -> None:
    """Temp folders left by a run killed while saving: never checkpoints."""
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def uninterrupted(deliver: bool = True):
    """Hold Ctrl-C (SIGINT) and SIGTERM off for the block (a checkpoint save): one that comes meanwhile is
    noted, said, and raised as KeyboardInterrupt when the block ends (`deliver`), or only said (the
    block is already the interrupt's own save). Main thread only (signals go there); elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came = []
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def note(signum, frame):
        if not came:
            log.warning("warning: interrupt received while a checkpoint is being written: finishing it first")
        came.append(signum)

    for sig in before:
        signal.signal(sig, note)
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if came and deliver:  # through the process's own handler, as if it came now
        os.kill(os.getpid(), came[0])
