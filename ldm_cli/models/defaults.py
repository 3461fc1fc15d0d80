"""A model's own sampling defaults: `ldm_defaults.json` in its folder, e.g. {"cfg": 5.0}.

Some models draw best away from the usual settings: a distilled one wants guidance near 1, the embedded
model composes best at cfg 5 (docs/performance.md, "Guidance", measures it). A model folder may say so; `ldm sample` and
`ldm img2img` then start from its values, and a flag given on the command line (or a prompt file's
`key=value`) still wins. InvokeAI's per-model "default settings" are the same idea. Keys: the settings a
prompt file may set, less seed and num_images (jobs.OVERRIDE_TYPES); `"why"` may hold a note.
"""

import json
from dataclasses import fields, replace
from pathlib import Path

from ldm_cli.errors import LdmError, check
from ldm_cli.jobs import Settings, validate

FILE = "ldm_defaults.json"
NOT_SETTINGS = ("seed", "num_images")
EMBEDDED_MODEL = Path(__file__).parent.parent / "embedded"


def default_model() -> str:
    """The embedded model (ldm_cli/embedded), what every command uses without --model."""
    check((EMBEDDED_MODEL / "model_index.json").is_file(),
          "no default model is installed yet; pass --model (a diffusers folder, a .safetensors file or a hub id)")
    return str(EMBEDDED_MODEL)


def model_defaults(model: str) -> dict:
    """The settings `model`'s folder recommends ({} for a single file, a hub id or a folder without the file)."""
    from ldm_cli.io.prompts import convert

    path = Path(model) / FILE
    if not path.is_file():
        return {}
    where = f"{path}: "
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LdmError(f"{where}not readable as JSON ({e}); fix or delete the file") from None
    check(isinstance(values, dict), f"{where}expected a JSON object of settings, e.g. {{\"cfg\": 5}}")
    values.pop("why", None)
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
