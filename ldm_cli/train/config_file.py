"""`ldm train --config train.toml`: every TrainConfig field as a TOML key (flags given on the command line
win), and OUT/config.toml, the run's resolved settings, so that `ldm train --config OUT/config.toml`
repeats it. Keys are the field names (`max_steps`, or `max-steps` as the flag spells it)."""

import difflib
import json
import math
import typing
from dataclasses import asdict, fields
from pathlib import Path

import tomllib

from ldm_cli.errors import LdmError, check
from ldm_cli.io.files import atomic_file
from ldm_cli.train.config import TrainConfig

MAX_BYTES = 1 << 20


def _kind(hint) -> tuple[type, bool]:
    """(the value type a field takes, whether it may be left out as None)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return tuple, False
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _checked(path: Path, key: str, value, hint):
    kind, _ = _kind(hint)
    where = f"{path}: {key} = {json.dumps(value, default=str)[:60]}"
    if kind is tuple:
        check(isinstance(value, list) and all(isinstance(v, str) for v in value),
              f"{where}: expected a list of strings, e.g. {key} = [\"a cat\"]")
        return tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    check(ok, f"{where}: expected {'true or false' if kind is bool else 'a number' if kind is float else kind.__name__}"
          f", got {type(value).__name__}")
    return value


def read_config(path: str | Path) -> dict:
    """The file's settings as TrainConfig keyword arguments, checked: an unknown key is named with the
    nearest valid one, a value of the wrong type with the type expected."""
    path = Path(path)
    check(path.is_file(), f"--config {path}: file not found")
    raw = path.read_bytes()
    check(len(raw) <= MAX_BYTES, f"--config {path}: larger than {MAX_BYTES} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise LdmError(f"--config {path}: not TOML ({str(e).splitlines()[0][:160]})") from None
    hints = typing.get_type_hints(TrainConfig)
    names = [f.name for f in fields(TrainConfig)]
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in hints:
            near = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
            raise LdmError(f"{path}: unknown key {key!r}" + (f"; did you mean {near[0]!r}?" if near else
                                                             "; see ldm train --help"))
        check(not isinstance(value, dict), f"{path}: [{key}] is a table; the settings are top-level keys")
        out[name] = _checked(path, key, value, hints[name])
    return out


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        check(not isinstance(value, float) or math.isfinite(value), f"cannot write {value} to TOML")
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a TOML basic string


def write_config(cfg: TrainConfig, path: Path) -> None:
    """The resolved settings as TOML (None fields left out: they resolve the same again), atomically."""
    lines = [f"# ldm train settings of this run; repeat it with: ldm train --config {path.name} --out NEW_OUT"]
    values = asdict(cfg)
    if cfg.epochs is not None:  # max_steps was resolved from it: giving both is refused
        values["max_steps"] = None
    lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    with atomic_file(path, overwrite=True) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8")
