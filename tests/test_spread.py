"""Several processes (accelerate's launcher, gloo on the CPU): `ldm sample --gpus N` makes the single process's
files bitwise, a killed run resumes without duplicates, `ldm train --gpus 2` trains as one process of twice the
batch and resumes exactly."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import LDM
from PIL import Image
from safetensors.torch import load_file

PROMPTS = "a red cat\na blue dog | seed=7\na green tree | steps=3\na cat\nan apple | cfg=4\nrocket\nmoon\n"


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "seven.txt"
    path.write_text(PROMPTS)
    return path


def pngs(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def recorded(folder):
    """(prompt, seed, steps) of every PNG's ldm metadata, with repeats."""
    out = []
    for p in sorted(folder.glob("*.png")):
        d = json.loads(Image.open(p).text["ldm"])
        out.append((d["prompt"], d["seed"], d["steps"]))
    return sorted(out)


@pytest.mark.slow
def test_sample_on_two_and_three_processes_makes_the_single_process_files(ldm, ldm_here, tiny_model, prompt_file,
                                                                      tmp_path):
    common = ("--prompt-file", prompt_file, "--model", tiny_model, "--steps", 2, "--device", "cpu", "--batch-size", 2)
    one = ldm_here("sample", *common, "--seed", 1, "-o", tmp_path / "one", "-q")
    three = ldm("sample", *common, "--seed", 1, "-o", tmp_path / "three", "--gpus", 3, "--json")
    assert one.returncode == 0 and three.returncode == 0, (one.stderr, three.stderr)
    assert len(pngs(tmp_path / "one")) == 7 and pngs(tmp_path / "three") == pngs(tmp_path / "one")
    listed = json.loads(three.stdout)  # printed once, by the first process, in the run's order
    assert [e["path"] for e in listed] == [str(tmp_path / "three" / n) for n in pngs(tmp_path / "one")]
    # no --seed: one random seed for every process (a seed per prompt line, as one process gives); the two
    # processes asked for through --launch, the launcher's own options
    two = ldm("sample", *common, "-o", tmp_path / "two", "--launch", "--num_processes 2 --multi_gpu", "--json")
    assert two.returncode == 0, two.stderr
    seeds = [e["seed"] for e in json.loads(two.stdout)]
    assert len(seeds) == 7 and seeds[1] == 7 and len(set(seeds[:1] + seeds[2:])) == 1
    assert len(pngs(tmp_path / "two")) == 7


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all below it (torchrun starts its workers in sessions of their own)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    family, todo = [], [pid]
    while todo:
        p = todo.pop()
        family.append(p)
        todo += parents.get(p, [])
    for p in family:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_killed_sampling_on_two_processes_resumes_without_duplicates(ldm, ldm_here, tiny_model, prompt_file, tmp_path):
    common = ("--prompt-file", prompt_file, "--model", tiny_model, "--steps", 40, "--device", "cpu", "--seed", 2)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([LDM, "sample", *map(str, common), "-o", str(out), "--gpus", "2", "-q"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.png"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    kill_tree(proc.pid)  # the launcher and both workers, mid-run
    proc.wait()
    before = len(list(out.glob("*.png")))
    assert 2 <= before < 7, before
    again = ldm("sample", *common, "-o", out, "--gpus", 2, "--skip-existing")
    assert again.returncode == 0, again.stderr
    assert f"{before} of 7 image(s) already in" in again.stderr
    want = ldm_here("sample", *common, "-o", tmp_path / "one", "-q")
    assert want.returncode == 0, want.stderr
    assert recorded(out) == recorded(tmp_path / "one")  # every job once, no duplicate
    pixels = {json.loads(Image.open(p).text["ldm"])["prompt"]: np.asarray(Image.open(p)) for p in out.glob("*.png")}
    for p in (tmp_path / "one").glob("*.png"):
        assert np.array_equal(pixels[json.loads(Image.open(p).text["ldm"])["prompt"]], np.asarray(Image.open(p)))
    done = ldm_here("sample", *common, "-o", out, "--skip-existing", "-q")
    assert done.returncode == 0 and len(list(out.glob("*.png"))) == 7  # nothing left to make


def parent(pid: int) -> int:
    return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])


def worker(launcher: int, rank: int) -> int | None:
    """The pid of the launched process of `rank` below `launcher`, if it is running."""
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            pid, at = int(environ.parent.name), int(environ.parent.name)
            if f"RANK={rank}".encode() not in environ.read_bytes().split(b"\0"):
                continue
            while at > 1 and at != launcher:
                at = parent(at)
            if at == launcher:
                return pid
        except (OSError, ValueError):
            pass
    return None


def launcher(ldm_pid: int) -> int | None:
    """The pid of accelerate's launcher that `ldm ... --gpus N` started."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"accelerate.commands.launch" in cmdline.read_bytes() and parent(int(cmdline.parent.name)) == ldm_pid:
                return int(cmdline.parent.name)
        except (OSError, ValueError):
            pass
    return None


@pytest.mark.slow
@pytest.mark.parametrize("victim,said", [("worker", "process 1 of 2"), ("launcher", "accelerate's launcher")])
def test_a_process_killed_under_the_launcher_is_named_in_one_line(victim, said, tiny_model, prompt_file, tmp_path):
    common = ("--prompt-file", prompt_file, "--model", tiny_model, "--steps", 40, "--device", "cpu", "--seed", 2)
    out = tmp_path / "out"
    proc = subprocess.Popen([LDM, "sample", *map(str, common), "-o", str(out), "--gpus", "2", "-q"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(out.glob("*.png")):
        time.sleep(0.05)
    pid = worker(proc.pid, 1) if victim == "worker" else launcher(proc.pid)
    assert pid is not None and proc.poll() is None
    os.kill(pid, signal.SIGKILL)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"ldm: error: {said} on this machine ended by SIGKILL"), err
    assert "Traceback" not in err and sum(x.startswith("ldm: error:") for x in lines) == 1, err
    assert all(Image.open(p).size == (64, 64) for p in out.glob("*.png"))  # what was written is whole


def marked(mark: str) -> list[int]:
    """The running processes with LDM_TEST_RUN=mark in their environment."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"LDM_TEST_RUN={mark}".encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # gone meanwhile
            pass
    return found


def ctrl_c(args: list, mark: str, ready) -> tuple[int, str]:
    """Run `ldm ARGS` as a terminal does (its own process group, SIGINT not blocked), press Ctrl-C once
    `ready()` holds: SIGINT to the whole group, the launcher included. Returns (exit status, stderr) once
    `ldm` has exited, and checks that no process of the run outlived it (`mark` is in their environment)."""
    def as_a_terminal():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen([LDM, *map(str, args)], env={**os.environ, "OMP_NUM_THREADS": "1", "LDM_TEST_RUN": mark},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=as_a_terminal)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        err = proc.communicate(timeout=120)[1]
    finally:
        kill_tree(proc.pid)
    assert marked(mark) == [], marked(mark)  # the launcher waited for its processes to save and end
    return proc.returncode, err


def ldm_lines(err: str) -> list[str]:
    """ldm's own lines of a stderr (accelerate's launcher may add a warning: another run holds port 29500)."""
    return [line for line in err.splitlines() if line.startswith("ldm:")]


@pytest.mark.slow
def test_ctrl_c_under_the_launcher_counts_every_process_images(tiny_model, prompt_file, tmp_path):
    out = tmp_path / "out"
    code, err = ctrl_c(["sample", "--prompt-file", prompt_file, "--model", tiny_model, "--steps", 40, "--device",
                        "cpu", "--seed", 2, "-o", out, "--gpus", 2, "-q"], str(tmp_path),
                       lambda: any(out.glob("*.png")))
    made, lines = len(list(out.glob("*.png"))), ldm_lines(err)
    assert code == 130 and len(lines) == 1 and "Traceback" not in err, err  # said once, by the first process
    assert lines[0].startswith(f"ldm: error: interrupted: {made} of 7 image(s) written") and 0 < made < 7, err


@pytest.mark.slow
def test_ctrl_c_under_the_launcher_saves_a_checkpoint_and_says_so(shapes, tiny_model, tmp_path):
    out = tmp_path / "run"

    def stepped() -> bool:
        return (out / "log.jsonl").is_file() and len((out / "log.jsonl").read_text().splitlines()) >= 3

    code, err = ctrl_c(["train", shapes, "--model", tiny_model, "--out", out, "--resolution", 64, "--batch-size", 1,
                        "--max-steps", 100000, "--lr", 1e-3, "--seed", 5, "--device", "cpu", "--log-every", 1,
                        "--cache-dir", tmp_path / "c", "--gpus", 2, "-q"], str(tmp_path), stepped)
    lines = ldm_lines(err)
    assert code == 130 and len(lines) == 1 and lines[0].startswith("ldm: error: interrupted at step "), err
    assert "Traceback" not in err
    step = int(lines[0].split("interrupted at step ")[1].split(";")[0])
    assert f"checkpoint {out / 'checkpoints' / f'step-{step:07d}'}; continue with --resume latest" in lines[0], err
    assert (out / "checkpoints" / f"step-{step:07d}").is_dir()


@pytest.mark.slow
def test_train_on_two_processes_equals_one_of_twice_the_batch_and_resumes(ldm, ldm_here, shapes, tiny_model, tmp_path):
    common = ("--model", tiny_model, "--from-scratch", "--lr", 1e-3, "--device", "cpu", "-q", "--seed", 3,
              "--cache-dir", tmp_path / "c", "--log-every", 1)
    one = ldm_here("train", shapes, *common, "--batch-size", 4, "--max-steps", 4, "--out", tmp_path / "one")
    two = ldm("train", shapes, *common, "--batch-size", 2, "--max-steps", 4, "--out", tmp_path / "two", "--gpus", 2)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr)
    assert two.stdout.strip() == str(tmp_path / "two" / "model")  # said once
    losses = {r: [json.loads(x)["loss"] for x in (tmp_path / r / "log.jsonl").read_text().splitlines()]
              for r in ("one", "two")}
    assert np.allclose(losses["one"], losses["two"], rtol=1e-5, atol=0), losses
    weights = {r: load_file(tmp_path / r / "model" / "unet" / "diffusion_pytorch_model.safetensors")
               for r in ("one", "two")}
    worst = max(float((weights["one"][k] - weights["two"][k]).abs().max()) for k in weights["one"])
    assert worst <= 1e-4, worst  # the same sums in another order (DDP's all-reduce): float rounding only
    half = ldm("train", shapes, *common, "--batch-size", 2, "--max-steps", 2, "--out", tmp_path / "resumed",
               "--gpus", 2)
    assert half.returncode == 0, half.stderr
    rest = ldm("train", shapes, *common, "--batch-size", 2, "--max-steps", 4, "--out", tmp_path / "resumed",
               "--gpus", 2, "--resume", "latest")
    assert rest.returncode == 0, rest.stderr
    resumed = load_file(tmp_path / "resumed" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(np.array_equal(resumed[k].numpy(), weights["two"][k].numpy()) for k in resumed)


def test_bad_input_under_the_launcher_is_one_line(ldm, tiny_model, tmp_path):
    r = ldm("sample", "x", "--model", tiny_model, "--device", "cpu", "--gpus", 2, "--steps", 0, "-o", tmp_path)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == ["ldm: error: --steps must be >= 1, got 0"]
    r = ldm("sample", "x", "--model", tiny_model, "--gpus", 2, "-o", tmp_path)
    assert r.returncode == 2 and "--gpus 2: this machine has 0 CUDA GPU(s)" in r.stderr
    r = ldm("sample", "x", "--model", tiny_model, "--device", "cpu", "--launch", "--num_machines '2", "-o", tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--launch" in r.stderr and "No closing quotation" in r.stderr


LEAVING = """import atexit, sys
from ldm_cli import runtime
atexit.register(lambda: open(sys.argv[1], "w").write("torn down"))
print("listing", end="")  # still in the buffer when it leaves
runtime.leave(3)
"""


@pytest.mark.parametrize("world", [None, "3"])
def test_a_launched_process_leaves_without_teardown_and_says_all(world, tmp_path):
    """One of several processes exits without the interpreter's teardown (where a gloo thread freeing a
    tensor can abort it, failing a finished run), its output flushed and its exit status kept; a lone
    process exits as usual."""
    marker = tmp_path / "atexit"
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"} | ({"WORLD_SIZE": world} if world else {})
    done = subprocess.run([str(Path(LDM).parent / "python"), "-c", LEAVING, str(marker)], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 3 and done.stdout == "listing", (done.returncode, done.stdout, done.stderr)
    assert marker.exists() == (world is None)


@pytest.mark.parametrize("given", [None, "45"])
def test_the_launcher_gives_stopped_processes_time_to_save(given, monkeypatch):
    """torchrun kills processes still running 30 s after a stop: too soon for a big checkpoint's rescue save.
    ldm hands its launcher 900 s, or the user's own TORCH_ELASTIC_SHUTDOWN_TIMEOUT."""
    import io

    from ldm_cli.train import launch

    seen = {}

    class Launcher:
        def __init__(self, cmd, env, **kw):
            seen.update(env=env, cmd=cmd)
            self.stderr = io.StringIO("")

        def wait(self):
            return 0

    monkeypatch.setattr(launch.subprocess, "Popen", Launcher)
    if given is None:
        monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", given)
    assert launch.launch(2, "no", ["train", "data", "--gpus", "2"]) == 0
    assert seen["env"]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == (given or "900")
    assert "--gpus" not in seen["cmd"] and seen["cmd"][-3:] == ["ldm_cli", "train", "data"]
