"""A model's own sampling defaults: `ldm_defaults.json` in its folder, e.g. {"cfg": 5.0}.

Some models draw best away from the usual settings: a distilled one wants guidance near 1, the embedded
model composes best at cfg 5 (docs/performance.md, "Guidance", measures it). A model folder may say so; `ldm sample` and
`ldm img2img` then start from its values, and a flag given on the command line (or a prompt file's
`key=value`) still wins. InvokeAI's per-model "default settings" are the same idea. Keys: the settings a
prompt file may set, less seed and num_images (jobs.OVERRIDE_TYPES); `"why"` may hold a note.

`"train"` holds what `ldm train` starts from when fine-tuning this model: the learning rate per kind of run,
e.g. {"full": {"lr": 3e-5}, "lora": {"lr": 1e-3}, "textual_inversion": {"lr": 5e-3}}. A small model moves
little at the rates written for SD 1.5 (the embedded model's LoRA learns nothing at 1e-4 in 100 steps).
"""

import json
from dataclasses import fields, replace
from pathlib import Path

from ldm_cli.errors import LdmError, check
from ldm_cli.jobs import Settings, validate

FILE = "ldm_defaults.json"
NOT_SETTINGS = ("seed", "num_images")
TRAIN_KINDS = ("full", "lora", "textual_inversion")
EMBEDDED_MODEL = Path(__file__).parent.parent / "embedded"


def default_model() -> str:
    """The embedded model (ldm_cli/embedded), what every command uses without --model."""
    check((EMBEDDED_MODEL / "model_index.json").is_file(),
          "no default model is installed yet; pass --model (a diffusers folder, a .safetensors file or a hub id)")
    return str(EMBEDDED_MODEL)


def _read(model: str) -> dict:
    """The file's JSON object ({} when the model has no such file)."""
    path = Path(model) / FILE
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LdmError(f"{path}: not readable as JSON ({e}); fix or delete the file") from None
    check(isinstance(values, dict), f"{path}: expected a JSON object of settings, e.g. {{\"cfg\": 5}}")
    return values


def model_defaults(model: str) -> dict:
    """The settings `model`'s folder recommends ({} for a single file, a hub id or a folder without the file)."""
    from ldm_cli.io.prompts import convert

    values = _read(model)
    where = f"{Path(model) / FILE}: "
    values.pop("why", None)
    values.pop("train", None)
    known = {f.name for f in fields(Settings)}
    for key in values:
        check(key in known and key not in NOT_SETTINGS,
              f"{where}{key!r} is not a sampling setting (known: {', '.join(sorted(known))})")
    return {k: convert(k, v, where) for k, v in values.items()}


def with_model_defaults(settings: Settings, model: str, given: set[str]) -> Settings:
    """`settings` with the model's recommended values for the options not given on the command line."""
    values = model_defaults(model)
    validate(replace(Settings(), **values), f"{Path(model) / FILE}: ")  # the file's own values, named as its
    return replace(settings, **{k: v for k, v in values.items() if k not in given})


def train_lr(model: str, kind: str) -> float | None:
    """The learning rate `model`'s folder recommends for fine-tuning it as `kind` (TRAIN_KINDS), or None."""
    train = _read(model).get("train", {})
    where = f"{Path(model) / FILE}: \"train\": "
    check(isinstance(train, dict) and set(train) <= {*TRAIN_KINDS, "why"},
          f"{where}expected an object with keys among {', '.join(TRAIN_KINDS)}, e.g. {{\"lora\": {{\"lr\": 1e-3}}}}")
    lr = train.get(kind, {}).get("lr") if isinstance(train.get(kind), dict) else None
    check(lr is None or isinstance(lr, (int, float)) and not isinstance(lr, bool) and 0 < lr < 1,
          f"{where}{kind}'s lr must be a number in (0, 1), got {lr!r}")
    return None if lr is None else float(lr)
