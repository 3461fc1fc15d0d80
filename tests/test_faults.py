"""Interrupted training never loses work: SIGKILL at random moments (also mid-save), Ctrl-C, a damaged
latest checkpoint, a full disk. Real `ldm train` processes on the tiny model (CPU)."""

import errno
import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import time

import pytest
import torch
from conftest import LDM
from test_train import losses, same_weights, unet_weights

from ldm_cli.errors import LdmError
from ldm_cli.train import checkpoints
from ldm_cli.train.config import TrainConfig
from ldm_cli.train.loop import train

STEPS = 60


def train_args(shapes, model, out, cache):
    return ["train", str(shapes), "--model", str(model), "--out", str(out), "--resolution", "64", "--batch-size", "2",
            "--max-steps", str(STEPS), "--lr", "1e-3", "--seed", "5", "--device", "cpu", "--log-every", "1",
            "--cache-dir", str(cache), "-q"]


def as_from_a_terminal():
    """Ctrl-C as a shell delivers it: SIGINT at its default, not blocked. A pytest-xdist worker can hand
    its children SIGINT ignored or blocked (seen in the full suite only), and a child that inherits
    that rightly never sees the signal."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([LDM, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=as_from_a_terminal)


def saved_steps(root):
    return [int(p.name.split("-")[1]) for p in checkpoints.checkpoints(root)]


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_loses_nothing(ldm_here, shapes, tiny_model, tmp_path):
    straight = ldm_here(*train_args(shapes, tiny_model, tmp_path / "straight", tmp_path / "c"))
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "killed"
    root = out / "checkpoints"
    args = train_args(shapes, tiny_model, out, tmp_path / "c") + ["--checkpoint-every", "1", "--keep-checkpoints", "2"]
    rng = random.Random(0)
    trials, during_save, lost, best = 6, 0, 0, 0  # half of them mid-save; each costs a process start
    for trial in range(trials):
        proc = start(args + (["--resume", "latest"] if saved_steps(root) else []))
        deadline = time.monotonic() + 60
        if trial % 2 == 0:  # kill the moment a checkpoint is being written (after one new one is complete)
            while time.monotonic() < deadline and proc.poll() is None:
                if root.is_dir() and any(p.name.startswith(".tmp-step") and int(p.name.split("-")[2]) > best + 1
                                         for p in root.iterdir()):
                    during_save += 1
                    break
                time.sleep(0.001)
        else:  # a random moment: while loading (k = 0), or k steps in plus a random part of a step. Counted in
            # steps, not seconds, so that a fast machine cannot finish all 60 steps before the mid-save kills.
            k = rng.randint(0, 3)
            if k == 0:
                time.sleep(rng.uniform(0.5, 3.0))
            while k and time.monotonic() < deadline and proc.poll() is None and max(saved_steps(root), default=0) < best + k:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.2))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        steps = saved_steps(root)
        assert all(checkpoints.verify(root / f"step-{s:07d}") is None for s in steps)  # never half-written
        if steps and steps[-1] < best:
            lost += 1
        best = max([best, *steps])
    final = start(args + ["--resume", "latest"])
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    print(f"SIGKILL trials {trials}, during a checkpoint write {during_save}, checkpoints lost {lost}, "
          f"last checkpoint before the final resume: step {best}/{STEPS}")
    assert lost == 0 and during_save >= trials // 2 - 1
    assert same_weights(unet_weights(tmp_path / "straight" / "model"), unet_weights(out / "model"))


def start_long_run(shapes, model, out, cache):
    """A run far longer than the test waits, so that a busy machine cannot let it finish before the
    signal (that raced once under two test workers: the run ended, then got a SIGINT it never saw);
    returns (process, its arguments) once it has logged 3 steps."""
    long_run = [a if a != str(STEPS) else "100000" for a in train_args(shapes, model, out, cache)]
    proc = start(long_run)
    while not (out / "log.jsonl").is_file() or len(losses(out)) < 3:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    return proc, long_run


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(shapes, tiny_model, tmp_path):
    out = tmp_path / "run"
    proc, long_run = start_long_run(shapes, tiny_model, out, tmp_path / "c")
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # never leave a 100,000-step run behind if the signal was not seen
    lines = err.strip().splitlines()
    assert proc.returncode == 130 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("ldm: error: interrupted at step ") and "--resume latest" in lines[0]
    step = int(lines[0].split("interrupted at step ")[1].split(";")[0])
    assert saved_steps(out / "checkpoints") == [step]
    resumed = start([a if a != "100000" else str(step + 2) for a in long_run] + ["--resume", "latest"])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())][-2:] == [step + 1, step + 2]


def small_cfg(shapes, model, tmp_path, **kw):
    return TrainConfig(data_dir=str(shapes), model=str(model), out_dir=str(tmp_path / "run"), batch_size=2, lr=1e-3,
                       device="cpu", cache_dir=str(tmp_path / "c"), checkpoint_every=2, keep_checkpoints=3,
                       **kw)


def test_damaged_latest_checkpoint_is_passed_over(shapes, tiny_model, tmp_path, caplog, monkeypatch):
    train(small_cfg(shapes, tiny_model, tmp_path, max_steps=5))
    root = tmp_path / "run" / "checkpoints"
    assert saved_steps(root) == [2, 4, 5]
    blob = root / "step-0000005" / "trainable.safetensors"
    data = bytearray(blob.read_bytes())
    data[-100] ^= 0xFF  # one flipped bit deep in the tensor data: still loads, but is wrong
    blob.write_bytes(bytes(data))
    monkeypatch.setattr(logging.getLogger("ldm"), "propagate", True)  # the CLI sends it to stderr instead
    with caplog.at_level(logging.WARNING, logger="ldm"):
        assert checkpoints.latest_checkpoint(root) == root / "step-0000004"
    assert "step-0000005: trainable.safetensors does not match the manifest" in caplog.text
    with pytest.raises(LdmError, match="damaged checkpoint"):
        checkpoints.load_checkpoint(root / "step-0000005")


def test_a_resume_reads_each_file_once_and_a_later_rewrite_is_still_caught(tmp_path, monkeypatch):
    """--resume latest verifies the checkpoint it finds, then loads it: the digests are taken once (an SD-1.5
    checkpoint is ~10 GB: a second reading cost 12 s), unless a file changed in between; state.pt, written
    without torch's per-record CRC, loads back equal, and torch's setting is left as it was."""
    root = tmp_path / "checkpoints"
    named = {"w": torch.randn(64, 64)}
    state = {"optimizer": {"state": {0: {"exp_avg": torch.randn(64, 64)}}, "param_groups": []}, "step": 3}
    ckpt = checkpoints.save_checkpoint(root, 3, named, {"w": named["w"] * 2}, state, {"train": {}}, keep=2)
    files = sorted(p for p in ckpt.iterdir() if p.name != checkpoints.MANIFEST)
    assert torch.utils.serialization.config.save.compute_crc32
    read, digest = [], checkpoints._hash_range
    monkeypatch.setattr(checkpoints, "_hash_range", lambda p, *span: read.append(p.name) or digest(p, *span))
    trainable, ema, loaded = checkpoints.load_checkpoint(checkpoints.find_resume(root, "latest"))
    assert sorted(read) == [p.name for p in files]  # each file under 64 MiB: one piece, read once
    assert torch.equal(trainable["w"], named["w"]) and torch.equal(ema["w"], named["w"] * 2)
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    blob = ckpt / "trainable.safetensors"
    data, before = bytearray(blob.read_bytes()), blob.stat()
    data[-100] ^= 0xFF  # rewritten in place, the same size
    blob.write_bytes(bytes(data))
    os.utime(blob, ns=(before.st_atime_ns, before.st_mtime_ns + 1))  # as a rewrite's clock moves it, however coarse
    with pytest.raises(LdmError, match="trainable.safetensors does not match the manifest"):
        checkpoints.load_checkpoint(ckpt)


def test_checkpoint_digests_are_of_pieces_and_a_changed_piece_or_an_old_manifest_is_told(tmp_path, monkeypatch):
    """A file's digest is BLAKE2b over its pieces' BLAKE2b digests in order (pieces hashed in parallel, so a 6 GiB
    state.pt is not one core's work): a byte changed in any piece fails verification; a checkpoint whose manifest
    holds whole-file digests (as written before) still verifies, and is caught the same when damaged."""
    monkeypatch.setattr(checkpoints, "PIECE", 1000)
    root = tmp_path / "checkpoints"
    named = {"w": torch.randn(50, 50)}  # 10 KB: eleven pieces
    ckpt = checkpoints.save_checkpoint(root, 1, named, None, {"step": 1}, {"train": {}}, keep=2)
    blob = ckpt / "trainable.safetensors"
    data = blob.read_bytes()
    assert len(data) > 10_000
    tree = hashlib.blake2b(digest_size=16)
    for start in range(0, len(data), 1000):
        tree.update(hashlib.blake2b(data[start:start + 1000], digest_size=16).digest())
    manifest = json.loads((ckpt / checkpoints.MANIFEST).read_text())
    assert manifest[blob.name] == {"bytes": len(data), "blake2b-pieces": tree.hexdigest()}
    assert tree.hexdigest() != hashlib.blake2b(data, digest_size=16).hexdigest()
    assert checkpoints.verify(ckpt) is None

    old = {n: {"bytes": (ckpt / n).stat().st_size, "blake2b": hashlib.blake2b((ckpt / n).read_bytes(),
                                                                              digest_size=16).hexdigest()}
           for n in manifest}
    (ckpt / checkpoints.MANIFEST).write_text(json.dumps(old))
    checkpoints._verified.clear()
    assert checkpoints.verify(ckpt) is None  # the manifest of an older ldm
    for manifest_now in (old, manifest):
        (ckpt / checkpoints.MANIFEST).write_text(json.dumps(manifest_now))
        changed = bytearray(data)
        changed[5500] ^= 0x01  # the sixth piece
        blob.write_bytes(bytes(changed))
        checkpoints._verified.clear()
        assert checkpoints.verify(ckpt) == "trainable.safetensors does not match the manifest"
        blob.write_bytes(data)


def as_written_on_a_gpu(state_pt):
    """Rewrite a state.pt as torch.save writes it on a GPU: each storage tagged cuda:0 (pickle protocol 2)."""
    import zipfile

    tmp, plain = state_pt.with_suffix(".gpu"), state_pt.with_suffix(".crc")
    torch.save(torch.load(state_pt, weights_only=True), plain)  # with the records' CRCs, which zipfile checks
    with zipfile.ZipFile(plain) as z, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as out:
        for info in z.infolist():
            data = z.read(info)
            if info.filename.endswith("data.pkl"):
                assert data.count(b"X\x03\x00\x00\x00cpu") == 1
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            out.writestr(info.filename, data)
    plain.unlink()
    tmp.replace(state_pt)


def test_a_checkpoint_written_on_a_gpu_resumes_on_a_cpu(shapes, tiny_model, tmp_path):
    """The optimizer's state of a GPU run is saved tagged cuda:0; a resume on a machine without CUDA loads it onto
    the host (it read as a damaged state.pt before) and goes on as the unbroken run does."""
    unbroken = train(small_cfg(shapes, tiny_model, tmp_path / "a", max_steps=4))
    train(small_cfg(shapes, tiny_model, tmp_path, max_steps=2))
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000002"
    as_written_on_a_gpu(ckpt / "state.pt")
    manifest = json.loads((ckpt / checkpoints.MANIFEST).read_text())
    manifest["state.pt"] = {"bytes": (ckpt / "state.pt").stat().st_size,
                            "blake2b": checkpoints._digest(ckpt / "state.pt")}
    (ckpt / checkpoints.MANIFEST).write_text(json.dumps(manifest))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(ckpt / "state.pt", weights_only=True)  # what the file now is
    resumed = train(small_cfg(shapes, tiny_model, tmp_path, max_steps=4), resume="latest")
    assert losses(tmp_path / "run") == losses(tmp_path / "a" / "run")
    assert same_weights(unet_weights(resumed), unet_weights(unbroken))


def test_disk_full_during_save_keeps_the_previous_checkpoint(shapes, tiny_model, tmp_path, monkeypatch):
    train(small_cfg(shapes, tiny_model, tmp_path, max_steps=2))
    root = tmp_path / "run" / "checkpoints"
    before = {p.name: p.read_bytes() for p in (root / "step-0000002").iterdir()}
    real_save = torch.save

    def full_disk(obj, path, *a, **k):  # the optimizer state is the last big write of a checkpoint
        real_save(obj, path, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(LdmError, match="No space left on device") as e:
        train(small_cfg(shapes, tiny_model, tmp_path, max_steps=4), resume="latest")
    assert e.value.exit_code == 1
    assert saved_steps(root) == [2] and not list(root.glob(".tmp-*"))
    assert {p.name: p.read_bytes() for p in (root / "step-0000002").iterdir()} == before
    assert json.loads((root / "step-0000002" / "manifest.json").read_text())


def test_a_background_checkpoint_holds_its_step_and_a_failed_write_is_raised(tmp_path, monkeypatch):
    """Written by a thread while training goes on: the checkpoint holds the tensors as they were when it was taken,
    not as the next steps change them in place; a write that fails is raised by poll(); without the host memory
    for the copy, the save is synchronous."""
    import threading

    release, real = threading.Event(), checkpoints.save_checkpoint
    monkeypatch.setattr(checkpoints, "save_checkpoint", lambda *a: release.wait(30) and real(*a))
    w, moment = torch.randn(64, 64), torch.randn(64, 64)
    before = (w.clone(), moment.clone())
    writer = checkpoints.Writer()
    state = {"optimizer": {"state": {0: {"exp_avg": moment}}}, "step": 3}
    path = writer.save(tmp_path, 3, {"w": w}, None, state, {}, keep=2, background=True)
    assert not path.exists()  # still being written: training goes on
    w.add_(1)  # the next steps, in place
    moment.mul_(2)
    release.set()
    writer.wait()
    trainable, _, loaded = checkpoints.load_checkpoint(path)
    assert torch.equal(trainable["w"], before[0])
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], before[1])

    def full(root, step, *a):
        raise checkpoints.write_failed(root / f"step-{step:07d}", OSError(errno.ENOSPC, "No space left on device"))

    monkeypatch.setattr(checkpoints, "save_checkpoint", full)
    writer.save(tmp_path, 4, {"w": w}, None, {"step": 4}, {}, keep=2, background=True)
    with pytest.raises(checkpoints.WriteFailed, match="step-0000004: cannot write"):
        for _ in range(3000):
            writer.poll()
            time.sleep(0.01)
    monkeypatch.setattr(checkpoints, "save_checkpoint", real)
    monkeypatch.setattr(checkpoints, "available_memory", lambda: 0)
    assert writer.save(tmp_path, 5, {"w": w}, None, {"step": 5}, {}, keep=2, background=True).is_dir()



def test_the_memory_a_background_checkpoint_may_take_counts_a_containers_limit(tmp_path):
    """MemAvailable is the host's; in a container its cgroup's limit less its usage is what a copy may take before
    the kernel kills the run."""
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal: 134217728 kB\nMemAvailable: 67108864 kB\n")  # 64 GiB
    assert checkpoints.available_memory(tmp_path) == 64 * 2**30
    v2 = tmp_path / "sys/fs/cgroup"
    v2.mkdir(parents=True)
    (v2 / "memory.max").write_text("max\n")  # no limit
    (v2 / "memory.current").write_text(f"{6 * 2**30}\n")
    assert checkpoints.available_memory(tmp_path) == 64 * 2**30
    (v2 / "memory.max").write_text(f"{8 * 2**30}\n")
    assert checkpoints.available_memory(tmp_path) == 2 * 2**30
    v1 = v2 / "memory"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text(f"{7 * 2**30}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{6 * 2**30}\n")
    assert checkpoints.available_memory(tmp_path) == 1 * 2**30
    (tmp_path / "proc/meminfo").unlink()
    assert checkpoints.available_memory(tmp_path) == 0

def test_a_full_disk_under_a_background_checkpoint_stops_the_run(shapes, tiny_model, tmp_path, monkeypatch):
    """The second checkpoint's write (in the background) fails: the run stops with the one line, exit 1, the first
    checkpoint intact and nothing half-written."""
    real_save, calls = torch.save, []

    def full_on_the_second(obj, path, *a, **k):
        calls.append(path)
        real_save(obj, path, *a, **k)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_on_the_second)
    with pytest.raises(LdmError, match="step-0000004: cannot write .No space left on device") as e:
        train(small_cfg(shapes, tiny_model, tmp_path, max_steps=8))
    root = tmp_path / "run" / "checkpoints"
    assert e.value.exit_code == 1
    assert saved_steps(root) == [2] and not list(root.glob(".tmp-*"))
    assert checkpoints.verify(root / "step-0000002") is None


FILL_A_REAL_DISK = r"""
import json, os, shutil, subprocess, sys, time
mount, copy_to, *cmd = sys.argv[1:]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", mount], check=True)
proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
root = os.path.join(mount, "run", "checkpoints")
while proc.poll() is None and not os.path.isdir(os.path.join(root, "step-0000002")):
    time.sleep(0.01)
filled = 0
try:  # another program takes every free byte while training goes on
    with open(os.path.join(mount, "filler"), "wb") as f:
        while True:
            f.write(b"\0" * (1 << 16)); f.flush(); filled += 1 << 16
except OSError:
    pass
out, err = proc.communicate(timeout=240)
shutil.copytree(os.path.join(mount, "run"), copy_to, symlinks=True)
json.dump({"rc": proc.returncode, "stderr": err, "filled": filled}, open(copy_to + ".json", "w"))
"""


@pytest.mark.slow
def test_a_real_full_disk_keeps_the_previous_checkpoints(ldm_here, shapes, tiny_model, tmp_path):
    """The output folder is a 64 MB tmpfs that another writer fills up mid-run (in a private mount
    namespace, so no root is needed where user namespaces are allowed)."""
    import shutil
    import sys

    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs `unshare -rm` (user and mount namespaces) to mount a small tmpfs")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    args = train_args(shapes, tiny_model, mount / "run", tmp_path / "c") + [
        "--checkpoint-every", "1", "--keep-checkpoints", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(["unshare", "-rm", sys.executable, "-c", FILL_A_REAL_DISK, str(mount), str(tmp_path / "after"),
                    LDM, *args], check=True, env=env, timeout=300)
    result = json.loads((tmp_path / "after.json").read_text())
    lines = result["stderr"].strip().splitlines()
    assert result["rc"] == 1 and len(lines) == 1 and "Traceback" not in result["stderr"], result
    assert "No space left on device" in lines[0] and "--resume latest" in lines[0], lines[0]
    root = tmp_path / "after" / "checkpoints"
    steps = saved_steps(root)
    assert steps and steps[-1] >= 2 and not list(root.glob(".tmp-*")), sorted(p.name for p in root.iterdir())
    assert all(checkpoints.verify(root / f"step-{s:07d}") is None for s in steps)
    # On a disk with room again, the run continues from the last checkpoint and ends where an
    # uninterrupted run ends, bit for bit.
    resumed = ldm_here(*train_args(shapes, tiny_model, tmp_path / "after", tmp_path / "c"), "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run([LDM, *train_args(shapes, tiny_model, tmp_path / "straight", tmp_path / "c")],
                              capture_output=True, text=True, env=env)
    assert straight.returncode == 0 and straight.stderr == "", straight.stderr  # -q: nothing from the libraries
    print(f"disk filled ({result['filled'] >> 20} MiB by another writer) after step {steps[-1]}; "
          f"message: {lines[0]}")
    assert same_weights(unet_weights(tmp_path / "straight" / "model"), unet_weights(tmp_path / "after" / "model"))


def test_second_ctrl_c_during_the_save_loses_nothing(shapes, tiny_model, tmp_path):
    """Ctrl-C, then Ctrl-C again and again while the interrupt's checkpoint is being written: the save
    finishes, the checkpoint verifies, the user is told where it is."""
    out = tmp_path / "run"
    proc, _ = start_long_run(shapes, tiny_model, out, tmp_path / "c")
    try:
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < 20:  # a burst of impatient Ctrl-Cs
            proc.send_signal(signal.SIGINT)
            time.sleep(0.002)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    lines = [line for line in err.strip().splitlines() if "still stopping" not in line and "finishing it" not in line]
    assert proc.returncode == 130 and len(lines) == 1 and "Traceback" not in err, err
    assert "interrupted at step " in lines[0] and "--resume latest" in lines[0], lines[0]
    step = int(lines[0].split("interrupted at step ")[1].split(";")[0])
    assert saved_steps(out / "checkpoints") == [step]
    assert checkpoints.verify(out / "checkpoints" / f"step-{step:07d}") is None


def test_training_never_replaces_what_it_did_not_create(ldm_here, shapes, tiny_model, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    (data / "model").mkdir()
    (data / "model" / "keep.txt").write_text("the user's own file")

    def ldm(*args):
        return ldm_here("train", *args, "--model", tiny_model, "--max-steps", 2, "--batch-size", 2, "--device", "cpu",
                        "--cache-dir", tmp_path / "c")

    for out in (data, data / "sub"):  # --out is, or is inside, the data folder
        r = ldm(data, "--out", out)
        assert r.returncode == 2 and "inside the data folder" in r.stderr, r.stderr
    assert (data / "model" / "keep.txt").read_text() == "the user's own file"
    assert not (data / "sub").exists() and not (data / "checkpoints").exists()
    run = tmp_path / "run"
    assert ldm(data, "--out", run).returncode == 0
    model = (run / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    r = ldm(data, "--out", run, "--lr", "1e-2")  # a second, different run into the same --out
    assert r.returncode == 2 and "already holds a run" in r.stderr and "--overwrite" in r.stderr, r.stderr
    r = ldm(data, "--out", run, "--resume", "latest")  # resuming a finished run: nothing to do
    assert r.returncode == 0 and "nothing to train" in r.stderr, r.stderr
    assert (run / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == model
    shutil.rmtree(run / "model")  # as a run stopped by a signal right at its last step leaves it
    r = ldm(data, "--out", run, "--resume", "latest")  # writes the model folder from the checkpoint
    assert r.returncode == 0 and "nothing to train" in r.stderr, r.stderr
    assert "latent cache" not in r.stderr  # ... reading no image: the cache is neither built nor checked
    assert checkpoints.named_step(run / "checkpoints" / "step-0000002") == 2
    assert checkpoints.named_step(tmp_path / "my-checkpoint") is None
    assert (run / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == model
    # a model folder older than the checkpoint (an earlier sitting's, the run trained on since) is rewritten
    (run / "model" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"an earlier step's weights")
    earlier = (run / "checkpoints" / "step-0000002").stat().st_mtime - 3600
    os.utime(run / "model", (earlier, earlier))
    r = ldm(data, "--out", run, "--resume", "latest")
    assert r.returncode == 0 and "nothing to train" in r.stderr, r.stderr
    assert (run / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == model
    r = ldm(data, "--out", run, "--lr", "1e-2", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (run / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() != model
    assert saved_steps(run / "checkpoints") == [2] and len(losses(run)) == 2  # the old run's log is gone too


def test_an_unreadable_image_met_mid_run_is_skipped_and_listed(shapes, tiny_model, tmp_path):
    """Without the latent cache, images are read at each step: a damaged one is skipped and listed, and
    the run ends; with --strict, it stops there, after a checkpoint of the steps done. (With buckets, the
    headers are read before the run: --strict refuses the damaged image there, nothing written.)"""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    (data / "no-caption.png").unlink()
    (data / "b" / "0.png").write_bytes((data / "b" / "0.png").read_bytes()[:80])  # cut short, still listed
    cfg = TrainConfig(data_dir=str(data), model=str(tiny_model), out_dir=str(tmp_path / "run"), max_steps=20,
                      batch_size=4, device="cpu", cache=False, seed=1, buckets="off")
    train(cfg)
    assert "0.png" in (tmp_path / "run" / "skipped.txt").read_text() and len(losses(tmp_path / "run")) == 20
    strict = TrainConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "strict"), "strict": True})
    with pytest.raises(LdmError, match=r"0\.png.*stopped at step (\d+); checkpoint .*--resume latest") as e:
        train(strict)
    step = int(str(e.value).split("stopped at step ")[1].split(";")[0])
    assert step >= 1 and saved_steps(tmp_path / "strict" / "checkpoints") == [step]
    early = TrainConfig(**{**strict.__dict__, "out_dir": str(tmp_path / "early"), "buckets": "on"})
    with pytest.raises(LdmError, match=r"0\.png: cannot read image .*; fix it or drop --strict$"):
        train(early)
    assert not (tmp_path / "early").exists()


def test_a_damaged_latent_cache_entry_is_rebuilt(shapes, tiny_model, tmp_path):
    cfg = small_cfg(shapes, tiny_model, tmp_path, max_steps=2)
    train(cfg)
    entries = sorted((tmp_path / "c").rglob("img/*.safetensors"))
    entries[0].write_bytes(entries[0].read_bytes()[:50])  # cut short
    notes = []
    train(TrainConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "again")}), say=notes.append)
    assert any("1 entries encoded" in n for n in notes), notes
    assert losses(tmp_path / "run") == losses(tmp_path / "again")


IN_A_SMALL_MOUNT = r"""
import json, subprocess, sys
mount, options, result, *cmd = sys.argv[1:]
subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", mount], check=True)
proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
listing = sorted(str(p) for p in __import__("pathlib").Path(mount).rglob("*"))
json.dump({"rc": proc.returncode, "stderr": proc.stderr, "listing": listing}, open(result, "w"))
"""


def in_a_small_mount(tmp_path, options, cmd):
    """Run `cmd` with a fresh tmpfs (mount options `options`) at tmp_path/mnt, in a private mount
    namespace; returns its exit code, stderr and what it left in the mount."""
    import shutil
    import sys

    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs `unshare -rm` (user and mount namespaces) to mount a small tmpfs")
    (tmp_path / "mnt").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(["unshare", "-rm", sys.executable, "-c", IN_A_SMALL_MOUNT, str(tmp_path / "mnt"), options,
                    str(tmp_path / "result.json"), *cmd], check=True, env=env, timeout=300)
    return json.loads((tmp_path / "result.json").read_text())


def test_a_full_disk_under_the_latent_cache_is_one_line(shapes, tiny_model, tmp_path):
    """The latent cache on a 16 KB disk: the first entry does not fit. One line naming the cache and what
    to do, exit 1, no traceback, no half-written entry, no model."""
    mnt = tmp_path / "mnt"
    r = in_a_small_mount(tmp_path, "size=16k", [LDM, *train_args(shapes, tiny_model, tmp_path / "run", mnt / "c")])
    lines = r["stderr"].strip().splitlines()
    assert r["rc"] == 1 and len(lines) == 1 and "Traceback" not in r["stderr"], r
    assert "cannot write the latent cache" in lines[0] and "--no-cache" in lines[0], lines[0]
    assert not [p for p in r["listing"] if p.endswith(".safetensors")], r["listing"]  # nothing half-written
    assert not (tmp_path / "run" / "model").exists()


def test_a_read_only_out_folder_is_one_line(shapes, tiny_model, tmp_path):
    """--out on a read-only file system (root cannot write there either): one line, exit 2, nothing trained."""
    mnt = tmp_path / "mnt"
    r = in_a_small_mount(tmp_path, "ro,size=1m", [LDM, *train_args(shapes, tiny_model, mnt / "run", tmp_path / "c")])
    lines = r["stderr"].strip().splitlines()
    assert r["rc"] == 2 and len(lines) == 1 and "Traceback" not in r["stderr"], r
    assert "--out" in lines[0] and "not writable" in lines[0], lines[0]
    assert r["listing"] == [] and not (tmp_path / "c").exists()  # refused before the cache was built
