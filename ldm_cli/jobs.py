"""Settings as plain frozen values: what one image needs to be made again.

A `Job` is one image: prompt, seed and settings. Commands turn their arguments into a list of jobs
(`build_jobs`); the pipeline batches consecutive jobs whose settings agree. Every PNG carries its
job as JSON, so `ldm sample --from-png` can rebuild it exactly.
"""

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from ldm_cli.diffusion.names import SAMPLERS, SCHEDULES, SIGMA_SAMPLERS
from ldm_cli.errors import check
from ldm_cli.options import check_ranges, option

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed
MAX_IMAGES = 10000  # per prompt: a typo like -n 1000000 is refused before any work
MAX_SIDE = 8192
MAX_JOBS = 1_000_000  # images one command may ask for: beyond it, split the prompt file


@dataclass(frozen=True)
class Settings:
    """What one image is made with (besides prompt and seed); recorded in every PNG."""
    steps: int = option(50, "Sampler steps.", min=1)
    # classifier-free guidance scale; <= 1 turns guidance off (as in diffusers)
    cfg: float = option(7.5, "Classifier-free guidance scale (<= 1: off).", min=0.0, max=100.0, finite=True)
    # Lin et al. 2024 sec. 3.4 (eq. 15-16): the guided output's std pulled back toward the conditional one's, a
    # share phi of the way; against over-exposure with zero-terminal-SNR models (they suggest 0.7)
    guidance_rescale: float = option(0.0, "Guidance rescale phi, 0..1 (0.7 for zero-terminal-SNR models).",
                                     min=0.0, max=1.0, finite=True)
    # Kynkaanniemi et al. 2024: guidance only at noise levels sigma in (LO, HI]; None: at every step
    guidance_interval: str | None = option(None, "Guidance only where the noise level sigma is in (LO, HI], e.g. "
                                           "0.28,5.42 (Kynkaanniemi et al. 2024); elsewhere the prompt alone.",
                                           metavar="LO,HI")
    # DDIM eq. 16: 0 is deterministic DDIM, 1 is DDPM-like noise; above 1 the direction term's root goes negative
    eta: float = option(0.0, "DDIM eta: 0 deterministic, 1 DDPM-like (--sampler ddim).", min=0.0, max=1.0,
                        finite=True)
    # pixels; None: the model's native size (or the init image's)
    width: int | None = option(None, "Width in pixels (multiple of 8).")
    height: int | None = option(None, "Height in pixels (multiple of 8).")
    negative: str = option("", "Negative prompt.")  # what guidance steers away from ("" = unconditional)
    # img2img only: how much of the init image is replaced by noise
    strength: float | None = option(None, "0..1: how much of the image is replaced (1 = all).", min=0.0,
                                    max=1.0, min_open=True, finite=True)
    # diffusion/names.py; the stochastic ones draw each step's noise from the image's own generator
    sampler: str = option("ddim", f"Sampler: {', '.join(SAMPLERS)}.", choices=tuple(SAMPLERS))
    # sigma spacing of the sigma samplers; "default" keeps the model's leading/trailing/linspace spacing
    schedule: str = option("default", f"Sigma spacing for {', '.join(SIGMA_SAMPLERS)}: default (the model's), "
                           "karras or exponential.", choices=tuple(SCHEDULES))
    # how prompts are read: AUTOMATIC1111's emphasis/BREAK/long prompts, or as plain text cut at 77 tokens
    prompt_syntax: str = option("a1111", "a1111: (emphasis:1.2), [less], BREAK, prompts past 75 tokens; plain: "
                                "the text as is, cut at the encoder's limit.", choices=("a1111", "plain"))
    # A1111's numbering: 1 = the text encoder's last layer, 2 = the one before (model cards' "clip skip 2")
    clip_skip: int = option(1, "Text encoder layer from the end (1: last; 2: penultimate).", min=1, max=12)
    # SDXL micro-conditioning (Podell et al. 2023, sec. 2.2); None: diffusers' defaults
    original_size: str | None = option(None, "SDXL: the original size it is told, WIDTHxHEIGHT (default: the "
                                       "output size).", metavar="WxH")
    crops_coords_top_left: str | None = option(None, "SDXL: the crop corner it is told, TOP,LEFT (default: 0,0).",
                                               metavar="TOP,LEFT")
    target_size: str | None = option(None, "SDXL: the target size it is told, WIDTHxHEIGHT (default: the output "
                                     "size).", metavar="WxH")


@dataclass(frozen=True)
class Request:
    """How a command's prompts become jobs: seeds and counts."""
    seed: int | None = option(None, "Seed of the first image; image k uses seed + k. Default: random.")
    num_images: int = option(1, "Images per prompt.", short="-n", min=1, max=MAX_IMAGES)
    prompt_file: Path | None = option(None, "Prompts, one per line ('prompt | seed=7 cfg=4'), or .jsonl.")


@dataclass(frozen=True)
class Job:
    prompt: str
    seed: int
    settings: Settings
    init_image: str | None = None  # img2img: path of the starting image

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "seed": self.seed, "init_image": self.init_image, **asdict(self.settings)}

    @classmethod
    def from_dict(cls, d: dict) -> "Job":
        known = {f.name for f in fields(Settings)}
        kw = {}
        for k, v in d.items():  # metadata may be hostile: coerce every value to its declared type
            if k in known and not (v is None and k in ("width", "height", "strength", "guidance_interval", *MICRO)):
                if isinstance(v, (bool, dict, list)):
                    raise ValueError(f"{k} has the wrong type")
                if OVERRIDE_TYPES[k] is int and not isinstance(v, int):  # steps 2.9 must not become 2
                    raise ValueError(f"{k} must be an integer, got {v!r}")
                kw[k] = OVERRIDE_TYPES[k](v)
        kw.setdefault("prompt_syntax", "plain")  # a PNG from before prompt syntax existed was read as plain text
        settings = Settings(**kw)
        return cls(prompt=str(d["prompt"]), seed=int(d["seed"]), settings=settings, init_image=d.get("init_image"))


OVERRIDE_TYPES = {"seed": int, "steps": int, "cfg": float, "guidance_rescale": float, "eta": float, "width": int,
                  "height": int, "negative": str, "strength": float, "num_images": int, "sampler": str, "schedule": str,
                  "prompt_syntax": str, "clip_skip": int, "guidance_interval": str,
                  "original_size": str, "crops_coords_top_left": str, "target_size": str}


MICRO = ("original_size", "crops_coords_top_left", "target_size")


def micro_pair(text: str, what: str) -> tuple[int, int]:
    """'1024x768' (width x height) -> (768, 1024), diffusers' (height, width); 'TOP,LEFT' -> (top, left)."""
    sep = "," if what.endswith("crops_coords_top_left") else "x"
    a, _, b = text.partition(sep)
    check(a.strip().isdigit() and b.strip().isdigit() and int(a) <= 100_000 and int(b) <= 100_000,
          f"{what.replace('_', '-')} must be {'TOP,LEFT' if sep == ',' else 'WIDTHxHEIGHT'} in pixels, got {text!r}")
    return (int(a), int(b)) if sep == "," else (int(b), int(a))


def interval_pair(text: str, what: str = "--guidance-interval") -> tuple[float, float]:
    """'0.28,5.42' -> (0.28, 5.42): two finite noise levels, 0 <= LO < HI."""
    a, _, b = text.partition(",")
    try:
        lo, hi = float(a), float(b)
    except ValueError:
        lo = hi = float("nan")
    check(math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi, f"{what} must be LO,HI with 0 <= LO < HI "
          f"(noise levels sigma, e.g. 0.28,5.42), got {text!r}")
    return lo, hi


def validate(s: Settings, where: str = "") -> None:
    """Check ranges once, before any model work; `where` prefixes messages (e.g. 'prompts.txt:3: ')."""
    check(isinstance(s.steps, int), f"{where}steps must be an integer, got {s.steps!r}")
    check_ranges(s, where)
    for name in ("width", "height"):
        v = getattr(s, name)
        check(v is None or (v >= 8 and v % 8 == 0 and v <= MAX_SIDE),
              f"{where or '--'}{name} must be a multiple of 8 between 8 and {MAX_SIDE}, got {v}")
    if s.negative:
        check_text(s.negative, f"{where}negative prompt")
    flag = where or "--"
    for name in MICRO:
        if getattr(s, name) is not None:
            micro_pair(getattr(s, name), f"{flag}{name}")
    if s.guidance_interval is not None:
        interval_pair(s.guidance_interval, f"{flag}guidance{'_' if where else '-'}interval")
    check(s.schedule == "default" or s.sampler in SIGMA_SAMPLERS, f"{flag}schedule {s.schedule} applies to "
          f"{', '.join(SIGMA_SAMPLERS)}; {s.sampler} keeps the model's spacing (drop it, or pick one of those)")
    check(s.eta == 0 or s.sampler == "ddim", f"{flag}eta applies to --sampler ddim only, got eta {s.eta} with "
          f"{s.sampler} (euler-a, dpm2-a, ddpm, lcm and the DPM++ SDE ones add their own noise)")
    check(s.sampler != "lcm" or s.steps <= 50, f"{flag}steps {s.steps}: the lcm sampler takes at most 50 steps "
          "(the schedule LCM models are distilled on); 2-8 is usual")


def check_text(text: str, what: str) -> None:
    """Prompts go into PNG metadata as A1111's `parameters` lines: a newline would forge a line of it
    (a fake `Negative prompt:` or `Steps:`), and control characters break it."""
    check(text.strip() != "", f"{what} is empty")
    bad = next((ch for ch in text if ord(ch) < 32 and ch != "\t" or ch in "\x7f\x85\u2028\u2029"), None)
    check(bad is None, f"{what} contains a line break or control character ({bad!r}); put it on one line"
          if bad != "\x00" else f"{what} contains a NUL byte")


def build_jobs(prompts: list[tuple[str, dict, str]], base: Settings, seed: int, num_images: int,
               init_images: list[str | None] = (None,)) -> list[Job]:
    """Expand (prompt, overrides, where) lines into jobs: image k of a line uses seed + k."""
    check(isinstance(seed, int) and 0 <= seed <= MAX_SEED, f"--seed must be between 0 and {MAX_SEED}, got {seed}")
    jobs = []
    for prompt, overrides, where in prompts:
        check_text(prompt, f"{where}prompt")
        over = dict(overrides)
        check(over.get("strength") is None or init_images != (None,),
              f"{where}strength applies to img2img only; drop it from this text-to-image line")
        line_seed = over.pop("seed", seed)
        n = over.pop("num_images", num_images)
        check(1 <= n <= MAX_IMAGES, f"{where or '--'}num-images must be between 1 and {MAX_IMAGES}, got {n}")
        check(0 <= line_seed <= MAX_SEED - n + 1, f"{where or '--'}seed must be between 0 and {MAX_SEED - n + 1} "
              f"for {n} image(s) (image k uses seed + k), got {line_seed}")
        settings = replace(base, **over)
        validate(settings, where)
        check(len(jobs) + n * len(init_images) <= MAX_JOBS, f"{where or ''}more than {MAX_JOBS} images asked for; "
              "split the prompt file or lower --num-images")
        for image in init_images:
            jobs += [Job(prompt, line_seed + k, settings, image) for k in range(n)]
    return jobs
