"""PNG metadata: A1111's `parameters` text (which image browsers read) and our `ldm` JSON chunk, from
which `ldm sample --from-png` rebuilds the job exactly. Metadata read back is untrusted: size-capped,
type- and range-checked."""

import json
import warnings
from pathlib import Path

from PIL import Image, PngImagePlugin

from ldm_cli.errors import LdmError, check
from ldm_cli.io.images import MAX_PIXELS, UNREADABLE, first_line
from ldm_cli.io.infotext import parameters_text, parse_parameters
from ldm_cli.jobs import MAX_SEED, Job, validate

MAX_METADATA_BYTES = 1 << 20


def png_info(job: Job, model: str, width: int, height: int, lora: str = "",
             embeddings: str = "", lora_hashes: str = "") -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    text = parameters_text(job, model, width, height, lora)
    text += f', Lora hashes: "{lora_hashes}"' if lora_hashes else ""
    info.add_itxt("parameters", text + (f", TI: {embeddings}" if embeddings else ""))
    from ldm_cli import __version__

    info.add_itxt("ldm", json.dumps({"version": __version__, **made_with(job, model, lora, embeddings, lora_hashes)}))
    return info


def made_with(job: Job, model: str, lora: str = "", embeddings: str = "", lora_hashes: str = "") -> dict:
    """What the `ldm` chunk records of an image besides the version: all that decides its pixels."""
    return {"model": model, **job.to_dict(), **({"lora": lora} if lora else {}),
            **({"lora_hashes": lora_hashes} if lora_hashes else {}), **({"embeddings": embeddings} if embeddings else {})}


def recorded_jobs(folder: Path) -> set[str]:
    """made_with() of every ldm PNG in `folder` (as sorted JSON), the version left out: the jobs done there.
    Only the text chunks are read; files that are not ldm PNGs (or are damaged) are passed over."""
    done = set()
    for path in sorted(folder.glob("*.png")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    text = getattr(im, "text", {}).get("ldm")
            data = json.loads(text) if text and len(text) <= MAX_METADATA_BYTES else None
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
        if isinstance(data, dict):
            data.pop("version", None)
            done.add(json.dumps(data, sort_keys=True))
    return done


EMBEDDED = "embedded"  # the model name PNGs record for the embedded model: the same on every machine
NOT_RECORDED = ""  # model of a PNG from another tool (A1111 names a checkpoint, not a path): use --model


def read_png_job(path: str | Path) -> tuple[Job, str | None, str]:
    """The (job, model, lora) an ldm PNG was made with, from its `ldm` chunk; model None is the embedded
    model. A PNG without one but with A1111's `parameters` (AUTOMATIC1111, Forge) gives its settings and
    model NOT_RECORDED. Paths in a PNG are never followed: an img2img PNG's init image is refused (redo it
    with `ldm img2img`), a LoRA is only named (the caller asks for --lora)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with warnings.catch_warnings():  # only the text chunks are read, never the pixels
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                check(im.format == "PNG", f"{path}: not a PNG file")
                chunks = im.text if hasattr(im, "text") else {}
                text, a1111 = chunks.get("ldm"), chunks.get("parameters")
    except Image.DecompressionBombError:
        raise LdmError(f"{path}: image is larger than {MAX_PIXELS} pixels; not an ldm PNG") from None
    except UNREADABLE as e:
        raise LdmError(f"{path}: cannot read PNG ({first_line(e)})") from None
    if text is None and a1111 is not None:
        return _a1111_job(path, a1111)
    check(size >= 0 and text is not None, f"{path}: PNG has no ldm or A1111 metadata; was it made by ldm?")
    check(len(text) <= MAX_METADATA_BYTES, f"{path}: ldm metadata is too large")
    try:
        data = json.loads(text)
        check(isinstance(data, dict), "not an object")
        job = Job.from_dict(data)
        validate(job.settings)
        check(isinstance(data["prompt"], str) and isinstance(data["model"], str), "prompt and model must be text")
        check(isinstance(data["seed"], int) and 0 <= job.seed <= MAX_SEED, "seed out of range")
        lora = data.get("lora", "")
        check(isinstance(lora, str), "lora must be text")
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError, LdmError) as e:
        raise LdmError(f"{path}: ldm metadata is damaged ({first_line(e)})") from None
    init = data.get("init_image")
    check(init is None, f"{path}: made by img2img from {str(init)[:200]!r}; paths in a PNG are not followed: "
          "redo it with ldm img2img IMAGE and the settings in the PNG")
    return job, (None if data["model"] == EMBEDDED else data["model"]), lora


def _a1111_job(path: Path, text: str) -> tuple[Job, str, str]:
    check(len(text) <= MAX_METADATA_BYTES, f"{path}: A1111 parameters are too large")
    try:
        job, _ = parse_parameters(text)
        validate(job.settings)
        check(0 <= job.seed <= MAX_SEED, "seed out of range")
    except (ValueError, TypeError, OverflowError, LdmError) as e:
        raise LdmError(f"{path}: A1111 parameters: {first_line(e)}") from None
    return job, NOT_RECORDED, ""


def png_field(path: str | Path, key: str) -> str:
    """A text field of an ldm PNG's chunk ("" when absent); read_png_job has checked the chunk."""
    with Image.open(path) as im:
        data = json.loads(im.text.get("ldm", "{}")) if hasattr(im, "text") else {}
    value = data.get(key, "") if isinstance(data, dict) else ""
    return value if isinstance(value, str) else ""


def png_embeddings(path: str | Path) -> str:
    """The textual-inversion tokens an ldm PNG names ("" for none)."""
    return png_field(path, "embeddings")


def png_lora_hashes(path: str | Path) -> dict[str, str]:
    """{LoRA name: hash} of every LoRA an ldm PNG was made with ({} for none)."""
    pairs = [item.partition(": ") for item in png_field(path, "lora_hashes").split(", ") if item]
    return {name: h for name, _, h in pairs}
