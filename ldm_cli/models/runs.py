"""An `ldm train` output folder given where its product is wanted: `--model RUN`, `--lora RUN` and
`--embedding RUN` mean RUN/model, RUN/lora and RUN/embedding/TOKEN.safetensors, what the run printed last.
A folder that is not a run (no config.toml and checkpoints/) is returned as it is."""

from pathlib import Path

from ldm_cli.errors import LdmError, check

OPTION = {"model": "--model", "lora": "--lora", "embedding": "--embedding"}  # what a run makes: the option it feeds
NAME = {"model": "a model", "lora": "a LoRA", "embedding": "an embedding"}


def is_run(path: Path) -> bool:
    return path.is_dir() and (path / "config.toml").is_file() and (path / "checkpoints").is_dir()


def product(path: Path, kind: str) -> Path:
    """`path` itself, or, for an `ldm train` run, its `kind` (model, lora or embedding); one line when the run
    made another kind or has not written its product yet."""
    if not is_run(path) or (kind == "model" and (path / "model_index.json").is_file()):
        return path
    made = [k for k in OPTION if (path / k).is_dir()]
    if made and kind not in made:
        raise LdmError(f"{OPTION[kind]} {path}: this `ldm train` run made {NAME[made[0]]} ({path / made[0]}); "
                       f"give it with {OPTION[made[0]]}")
    check(kind in made, f"{OPTION[kind]} {path}: this `ldm train` run has written no {kind}/ yet (it writes it "
          f"when it ends); finish it with `ldm train ... --out {path} --resume latest`")
    if kind != "embedding":
        return path / kind
    files = sorted((path / kind).glob("*.safetensors"))
    check(len(files) == 1, f"--embedding {path}: {path / kind} holds {len(files)} .safetensors files; name one")
    return files[0]
