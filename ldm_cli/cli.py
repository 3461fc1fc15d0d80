"""The command line: parse, call one library function, print. The only module importing typer/rich.

Options are declared once, as fields of the settings dataclasses (`options.py`); `command` builds
each typer command's parameters from them, so `sample` and `img2img` share one declaration and the
CLI's defaults are the library's.
Errors: library code raises LdmError; `main` prints it once as one line on stderr and exits with its
code (2: bad input, 1: the work failed). `--debug` (or LDM_DEBUG=1) shows the traceback instead.
"""

import inspect
import json
import os
import sys
import types
import typing
from contextlib import nullcontext
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from ldm_cli import runtime
from ldm_cli.errors import USAGE, LdmError, check
from ldm_cli.jobs import Request, Settings
from ldm_cli.models.options import LoadOptions
from ldm_cli.options import spec_of
from ldm_cli.sample.options import OutputOptions
from ldm_cli.sample.options import validate as validate_output
from ldm_cli.sample.requests import prompt_jobs, redo_png, with_prompt_loras
from ldm_cli.train.config import TrainConfig

try:  # typer >= 0.26 carries its own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException

runtime.quiet_environment()  # before any command imports diffusers/transformers

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]},
                  help="Text-to-image latent diffusion: sample, img2img, train, info.")


def _version(value: bool) -> None:
    if value:
        from ldm_cli import __version__

        print(f"ldm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Text-to-image latent diffusion: sample, img2img, train, info."""


# ---- commands built from the dataclasses ---------------------------------------------------------------

def _typer_type(hint):
    """A dataclass field's type as typer takes it: `X | None` -> Optional[X], tuples -> lists."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in args if a is not type(None)][0]
        return Optional[_typer_type(inner)]
    if typing.get_origin(hint) is tuple:
        return Optional[list[args[0]]]
    return hint


def _params(cls, only=None, skip=(), defaults=None):
    """typer parameters for `cls`'s CLI fields (all, or `only`), less `skip`, with `defaults` replaced."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        s = spec_of(f)
        if s is None or not s.cli or f.name in skip or (only is not None and f.name not in only):
            continue
        flag = f"--{s.flag or f.name.replace('_', '-')}"
        decls = [f"{flag}/--no-{flag[2:]}"] if s.negatable else [flag]
        decls += [s.short] if s.short else []
        default = (defaults or {}).get(f.name, f.default if f.default is not MISSING else None)
        default = None if isinstance(default, tuple) else default
        annotation = Annotated[_typer_type(hints[f.name]), typer.Option(*decls, help=s.help, metavar=s.metavar)]
        out.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    return out


def _take(cls, kw: dict, **fixed):
    """Build `cls` from the parsed options it declares (popped from kw), plus `fixed` values."""
    names = {f.name for f in fields(cls)}
    values = {k: kw.pop(k) for k in list(kw) if k in names}
    hints = typing.get_type_hints(cls)
    for k, v in values.items():
        if typing.get_origin(hints[k]) is tuple:
            values[k] = tuple(v or ())
    return cls(**{**values, **fixed})


COMMON = [inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=False,
                            annotation=Annotated[bool, typer.Option("--debug", help="Show tracebacks.")])]


def command(*params):
    """Register a typer command whose parameters are `params` (inspect.Parameter) plus --debug; the
    function gets them all as keywords, and `given` (the names set on the command line) if it takes it."""
    def register(fn):
        def wrapper(ctx: typer.Context, **kw):
            kw.pop("debug", None)
            if "given" in inspect.signature(fn).parameters:
                kw["given"] = {k for k in kw if ctx.get_parameter_source(k).name == "COMMANDLINE"}
            return fn(**kw)

        ctx_param = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
        wrapper.__signature__ = inspect.Signature([ctx_param, *params, *COMMON])
        wrapper.__doc__, wrapper.__name__ = fn.__doc__, fn.__name__
        app.command(fn.__name__)(wrapper)
        return fn
    return register


def _arg(name, annotation, help, default=inspect.Parameter.empty):
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                             annotation=Annotated[annotation, typer.Argument(help=help)])


PROMPTS = _arg("prompt", Optional[list[str]], "Prompt(s); each is its own request.", None)
FROM_PNG = inspect.Parameter("from_png", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
    Optional[Path], typer.Option(help="Redo the image this ldm PNG was made with.")])
GPUS = inspect.Parameter("gpus", inspect.Parameter.KEYWORD_ONLY, default=1, annotation=Annotated[
    int, typer.Option(help="Processes (GPUs) to launch through accelerate.", min=1)])
LAUNCH = inspect.Parameter("launch", inspect.Parameter.KEYWORD_ONLY, default="", annotation=Annotated[
    str, typer.Option(help="With --gpus: more options for accelerate's launcher, e.g. '--num_machines 2 "
                      "--machine_rank 0 --main_process_ip 10.0.0.1 --num_processes 16'.")])
MAKE = [*_params(Request), *_params(LoadOptions), *_params(OutputOptions), GPUS, LAUNCH]


@command(PROMPTS, FROM_PNG, *_params(Settings, skip=("strength",)), *MAKE)
def sample(prompt=None, from_png=None, given=frozenset(), **kw):
    """Generate images from text.

    The defaults shown are overridden by the model folder's ldm_defaults.json where it has one (the embedded
    model's: cfg 5); options given here win."""
    _make(prompt, from_png, kw, given=given)


@command(_arg("image", Path, "Starting image, or a folder of them."), _arg("prompt", Optional[list[str]], "Prompt(s).",
         None), *_params(Settings, defaults={"strength": 0.75}), *MAKE)
def img2img(image, prompt=None, given=frozenset(), **kw):
    """Generate images starting from an image (SDEdit). Defaults as for `sample` (ldm_defaults.json)."""
    from ldm_cli.io.images import list_images

    _make(prompt, None, kw, list_images(image), given)


def _make(prompt, from_png, kw, init_images=(None,), given=frozenset()):
    gpus, launch = kw.pop("gpus"), kw.pop("launch")
    settings, request = _take(Settings, kw), _take(Request, kw)
    load, out = _take(LoadOptions, kw), _take(OutputOptions, kw)
    validate_output(out)
    if from_png is not None:
        if prompt or request.prompt_file:
            raise LdmError("--from-png redoes one image: give no PROMPT or --prompt-file with it")
        jobs, load = redo_png(from_png, settings, request, load, given)
    else:  # the model's own defaults (ldm_defaults.json) under what the command line gives
        from ldm_cli.models.defaults import default_model, with_model_defaults

        settings = with_model_defaults(settings, load.model or default_model(), given)
        jobs = prompt_jobs(prompt, settings, request, init_images, out.skip_existing)
    load = with_prompt_loras(jobs, load, from_png)
    if gpus > 1 or launch:  # the jobs are valid: the same command again, a process per GPU
        _relaunch(gpus, "no", load.device, launch)
    from ldm_cli.sample.spread import processes

    procs = processes(load.device)
    if procs is not None:  # each process on its own GPU
        from ldm_cli.sample.spread import shared_seed

        jobs = shared_seed(jobs, request.seed is not None, procs)
        load = replace(load, device=str(procs.device) if load.device != "cpu" else "cpu")
    _run(jobs, load, out, procs)
    if procs is not None:  # a process group left to the interpreter's exit can abort it ("terminate called")
        procs.wait_for_everyone()
        procs.destroy_process_group()


def _run(jobs, load: LoadOptions, out: OutputOptions, procs=None):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ldm_cli.sample.run import Stopped, generate
    from ldm_cli.sample.run import load as load_model

    runtime.configure_torch(load.accel)
    runtime.quiet_libraries()
    first = procs is None or procs.is_main_process
    err = Console(stderr=True, quiet=out.quiet or not first)  # one process speaks for all
    show_progress = not out.quiet and err.is_terminal  # bars in a log file are noise
    with err.status("loading model", spinner="dots") if show_progress else nullcontext():
        model = load_model(load)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=False, disable=not show_progress) as progress:
        images_task = progress.add_task("images", total=len(jobs), rate="")
        steps_task = progress.add_task("steps", total=None, rate="", visible=False)  # shown from the first step
        clock = {"t": None}

        def on_step(done, total):
            import time

            now = time.perf_counter()
            if done == 1:
                clock["t"] = now
            rate = f"{(done - 1) / (now - clock['t']):.2f} it/s" if done > 1 and now > clock["t"] else ""
            progress.update(steps_task, completed=done, total=total, rate=rate, visible=True)

        done = []

        def on_image(w, made, total):
            done.append(w)
            progress.update(images_task, completed=made, total=total)

        try:
            written = generate(model, jobs, out, on_image=on_image, on_step=on_step, procs=procs)
        except KeyboardInterrupt as e:  # say what is on disk: every image written is whole
            made = e.made if isinstance(e, Stopped) else len(done)  # Stopped: every process's images
            last = f", the last {done[-1].path}" if done and made == len(done) else ""
            raise LdmError(f"interrupted: {made} of {len(jobs)} image(s) written{last}", 130) from None
    if not first:
        return
    if out.as_json:
        print(json.dumps([w.to_dict() for w in written], indent=2))
    elif not out.quiet:
        for w in written:
            err.print(f"wrote {w.path}", highlight=False)


@command(_arg("model", Optional[str], "Model to describe (or a LoRA, an embedding, a picture, an ldm train run); "
              "default: the embedded model.", None),
         *_params(LoadOptions, only=("config", "allow_unsafe_pickle")),
         *_params(OutputOptions, only=("as_json",)))
def info(model=None, config=None, allow_unsafe_pickle=False, as_json=False):
    """Show a model's components, parameter counts, scheduler, dtype and size on disk; or what a LoRA, an
    embedding, a picture's recorded settings or an `ldm train` run folder holds."""
    from ldm_cli.models.info import describe
    from ldm_cli.models.peek import peek
    from ldm_cli.sample.run import load

    runtime.quiet_libraries()
    facts = peek(model) if model is not None else None
    facts = facts or describe(load(LoadOptions(model=model, config=config, device="cpu",
                                               allow_unsafe_pickle=allow_unsafe_pickle)).components)
    if as_json:
        print(json.dumps(facts, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=facts.get("model") or facts.get("run") or facts["file"], show_header=False)
    for key, value in facts.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    Console().print(table)


RESUME = inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
    Optional[str], typer.Option(help="latest or a checkpoint folder.")])


TRAIN_CONFIG = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
    Optional[Path], typer.Option(help="TOML file of settings (e.g. OUT/config.toml); flags given here win.")])


@command(_arg("data_dir", Optional[Path], "Folder of images with .txt captions or metadata.jsonl/.csv.", None),
         *_params(TrainConfig), TRAIN_CONFIG, RESUME, GPUS, LAUNCH, *_params(OutputOptions, only=("quiet",)))
def train(data_dir=None, config=None, resume=None, gpus=1, launch="", quiet=False, given=frozenset(), **kw):
    """Fine-tune (full or LoRA) or train from scratch a U-Net on a folder of captioned images."""
    from ldm_cli.train.config import validate_config

    cfg = _take(TrainConfig, kw, data_dir=str(data_dir or ""))
    if config is not None:  # the file's values, then the flags given on the command line over them
        from ldm_cli.train.config_file import read_config

        over = {f.name: getattr(cfg, f.name) for f in fields(TrainConfig) if f.name in given}
        if data_dir is not None:
            over["data_dir"] = str(data_dir)
        cfg = TrainConfig(**{**read_config(config), **over})
    validate_config(cfg)
    if gpus > 1 or launch:
        _relaunch(gpus, cfg.mixed_precision, cfg.device, launch)
    _train(cfg, resume, quiet)


def _relaunch(gpus: int, mixed_precision: str, device: str, extra: str = ""):
    """This same command again under accelerate's launcher (train/launch.py)."""
    from ldm_cli.train.launch import check_launch, launch

    check_launch(gpus, device, extra)
    raise typer.Exit(launch(gpus, mixed_precision, _ARGV, extra))


def _train(cfg, resume, quiet):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ldm_cli.train.loop import train as run_training

    runtime.quiet_libraries()
    runtime.keep_compile_cache()  # --compile's kernels, kept for the next run
    err = Console(stderr=True, quiet=quiet)
    columns = [TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
               TimeRemainingColumn()]
    with Progress(*columns, console=err, disable=quiet or not err.is_terminal) as progress:
        task = progress.add_task("train", total=None, stats="")

        def report(r, total):
            stats = f"loss {r['loss']:.4f} lr {r['lr']:.2e} {r['images_per_s'] or 0:.1f} img/s"
            if progress.disable:  # a log file: one line per --log-every steps, and the last
                if not quiet and (r["step"] % cfg.log_every == 0 or r["step"] == total):
                    print(f"step {r['step']}/{total} {stats}", file=sys.stderr)
            else:
                progress.update(task, completed=r["step"], total=total, stats=stats)

        result = run_training(cfg, resume=resume, on_log=report,
                              say=lambda text: None if quiet else err.print(text, highlight=False, soft_wrap=True))
    if os.environ.get("RANK", "0") == "0":  # under accelerate's launcher, the first process answers
        print(result)


_ARGV: list[str] = []  # this process's arguments, for `train --gpus N` to hand on to accelerate's launcher


def _value_missing(argv: list[str]) -> str | None:
    """An option that takes a value followed by another of the command's options (`--buckets --lora-rank 4`):
    click takes '--lora-rank' for the value, then reports an extra '4', or, where a command takes several
    arguments (`sample "x" --negative --steps 3`), runs with '3' as a prompt. What is missing, or None."""
    import typer.main

    group = typer.main.get_command(app)
    argv = [str(a) for a in argv]  # cli.main([...]) from Python may hand numbers
    at = next((i for i, a in enumerate(argv) if a in group.commands), None)
    if at is None:
        return None
    params = group.commands[argv[at]].params
    names = {n for p in params for n in p.opts + p.secondary_opts}
    takes = {n for p in params if p.param_type_name == "option" and not (p.is_flag or p.count) for n in p.opts}
    for a, b in zip(argv[at + 1:], argv[at + 2:]):
        if a == "--":
            break
        if a in takes and b.split("=")[0] in names:
            return f"{a} needs a value, but the next argument is the option {b}"
    return None


def main(argv: list[str] | None = None) -> None:
    runtime.leave(_main(argv))


def _main(argv: list[str] | None) -> int:
    """The command's exit status: 0, 2 bad input, 1 failed work, 130 interrupted."""
    global _ARGV
    argv = sys.argv[1:] if argv is None else argv
    _ARGV = list(argv)
    debug = "--debug" in argv or os.environ.get("LDM_DEBUG", "") not in ("", "0")
    runtime.setup(quiet="-q" in argv or "--quiet" in argv, debug=debug, libraries=False)
    try:
        missing = _value_missing(argv)  # else click takes the next option for the value, often silently
        check(missing is None, str(missing))
        code = app(args=argv, prog_name="ldm", standalone_mode=False)
    except LdmError as e:
        if debug:
            raise
        if e.exit_code != 130 or os.environ.get("RANK", "0") == "0":  # the first process reports an interrupt
            print(f"ldm: error: {e}", file=sys.stderr)
        runtime.exiting()
        return e.exit_code
    except ClickException as e:  # typer's own parsing errors: bad option values, unknown options
        if debug:
            raise
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare `ldm`: the help itself, not an error around it
            print(e.format_message(), file=sys.stderr)
        else:
            print(f"ldm: error: {e.format_message()} (see 'ldm --help')", file=sys.stderr)
        return e.exit_code if e.exit_code else USAGE
    except (RuntimeError, MemoryError) as e:  # torch's CPU allocator reports running out as a RuntimeError
        if debug or (isinstance(e, RuntimeError) and "can't allocate memory" not in str(e)):
            raise
        print("ldm: error: out of memory (CPU RAM): try a smaller --batch-size, --width/--height or data",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ldm: interrupted", file=sys.stderr)
        runtime.exiting()
        return 130
    return code if isinstance(code, int) else 0
