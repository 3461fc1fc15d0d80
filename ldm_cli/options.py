"""Options declared once: each field of a settings dataclass carries its default, help and range.

The dataclasses live beside the code they configure (`jobs.Settings`, `models.options.LoadOptions`,
`sample.options.OutputOptions`, `train.config.TrainConfig`); `cli.py` builds the typer commands from their
fields, so `sample` and `img2img` share one declaration and the CLI and the library have the same
defaults. `check_ranges` is the range check every dataclass's `validate` starts with.

    steps: int = option(50, "Denoising steps.", min=1)

No typer here: this module only describes; the CLI edge turns descriptions into options.
"""

import math
from dataclasses import dataclass, field, fields

from ldm_cli.errors import check


@dataclass(frozen=True)
class Spec:
    help: str
    flag: str | None = None  # the long flag without "--"; default: the field name with '-' for '_'
    short: str | None = None  # e.g. "-n"
    min: float | None = None
    max: float | None = None
    min_open: bool = False  # min itself is not allowed: (min, max]
    choices: tuple[str, ...] = ()
    finite: bool = False  # floats: NaN and infinities refused
    cli: bool = True  # False: a library-only field (no command-line flag)
    negatable: bool = False  # booleans: --x/--no-x instead of a bare --x flag
    metavar: str | None = None


def option(default, help: str, **spec):
    """A dataclass field with its CLI description (see Spec for the keywords)."""
    return field(default=default, metadata={"ldm": Spec(help, **spec)})


def spec_of(f) -> Spec | None:
    return f.metadata.get("ldm")


def flag_name(f) -> str:
    s = spec_of(f)
    return f"--{(s.flag if s and s.flag else f.name.replace('_', '-'))}"


def _or_list(items) -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def describe_range(s: Spec, is_float: bool) -> str:
    """'a finite number in (0, 1]', '>= 1', 'between 1 and 10000': what the value must be."""
    number = "a finite number " if is_float and s.finite else ""
    lo, hi = s.min, s.max
    if lo is not None and hi is not None:
        if is_float:  # a range excludes NaN and infinities by itself
            return f"in {'(' if s.min_open else '['}{lo:g}, {hi:g}]"
        return f"between {lo} and {hi}"
    if lo is not None:
        return f"{number}{'>' if s.min_open else '>='} {lo:g}" if is_float else f">= {lo}"
    if hi is not None:
        return f"{number}<= {hi:g}"
    return number.strip()


def check_ranges(obj, where: str = "") -> None:
    """Check every field of `obj` against its Spec. Messages name the option as the user wrote it:
    `--steps` on the command line, `steps` after a prompt file's `file:line: ` (`where`)."""
    for f in fields(obj):
        s, value = spec_of(f), getattr(obj, f.name)
        if s is None or value is None or isinstance(value, bool):
            continue
        label = f"{where}{f.name}" if where else flag_name(f)
        if s.choices:
            check(value in s.choices, f"{label} must be {_or_list(s.choices)}, got {value!r}")
            continue
        if not isinstance(value, (int, float)):
            continue
        is_float = isinstance(value, float) or isinstance(f.default, float)
        ok = not (s.finite and not math.isfinite(value))
        ok = ok and (s.min is None or (value > s.min if s.min_open else value >= s.min))
        ok = ok and (s.max is None or value <= s.max)
        check(ok, f"{label} must be {describe_range(s, is_float)}, got {value}")
