"""Settings as plain frozen values: what one image needs to be made again.

A `Job` is one image: prompt, seed and settings. Commands turn their arguments into a list of jobs
(`build_jobs`); the pipeline batches consecutive jobs whose settings agree. Every PNG carries its
job as JSON, so `ldm sample --from-png` can rebuild it exactly.
"""

import math
from dataclasses import asdict, dataclass, fields, replace

from ldm_cli.errors import check

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


@dataclass(frozen=True)
class Settings:
    steps: int = 50  # DDIM steps
    cfg: float = 7.5  # classifier-free guidance scale; <= 1 turns guidance off
    eta: float = 0.0  # DDIM eq. 16: 0 is deterministic DDIM, 1 is DDPM-like noise
    width: int | None = None  # pixels; None: the model's native size (or the init image's)
    height: int | None = None
    negative: str = ""  # the prompt guidance steers away from ("" = unconditional)
    strength: float | None = None  # img2img only: how much of the init image is replaced by noise


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
            if k in known and not (v is None and k in ("width", "height", "strength")):
                if isinstance(v, (bool, dict, list)):
                    raise ValueError(f"{k} has the wrong type")
                kw[k] = OVERRIDE_TYPES[k](v)
        settings = Settings(**kw)
        return cls(prompt=str(d["prompt"]), seed=int(d["seed"]), settings=settings, init_image=d.get("init_image"))


OVERRIDE_TYPES = {"seed": int, "steps": int, "cfg": float, "eta": float, "width": int, "height": int,
                  "negative": str, "strength": float, "num_images": int}


def validate(s: Settings, where: str = "") -> None:
    """Check ranges once, before any model work; `where` prefixes messages (e.g. 'prompts.txt:3: ')."""
    check(isinstance(s.steps, int) and s.steps >= 1, f"{where}steps must be >= 1, got {s.steps}")
    check(math.isfinite(s.cfg) and s.cfg >= 0, f"{where}cfg must be a finite number >= 0, got {s.cfg}")
    # eta > 1 makes DDIM's sigma exceed sqrt(1 - alpha_bar_prev): the direction term's root goes negative
    check(math.isfinite(s.eta) and 0 <= s.eta <= 1, f"{where}eta must be a number in [0, 1], got {s.eta}")
    for name in ("width", "height"):
        v = getattr(s, name)
        check(v is None or (v >= 8 and v % 8 == 0 and v <= 8192),
              f"{where}{name} must be a multiple of 8 between 8 and 8192, got {v}")
    if s.strength is not None:
        check(math.isfinite(s.strength) and 0 < s.strength <= 1,
              f"{where}strength must be in (0, 1], got {s.strength}")
    check("\x00" not in s.negative, f"{where}negative prompt contains a NUL byte")


def build_jobs(prompts: list[tuple[str, dict, str]], base: Settings, seed: int, num_images: int,
               init_images: list[str | None] = (None,)) -> list[Job]:
    """Expand (prompt, overrides, where) lines into jobs: image k of a line uses seed + k."""
    jobs = []
    for prompt, overrides, where in prompts:
        check(prompt.strip() != "", f"{where}empty prompt")
        check("\x00" not in prompt, f"{where}prompt contains a NUL byte")
        over = dict(overrides)
        line_seed = over.pop("seed", seed)
        n = over.pop("num_images", num_images)
        check(0 <= line_seed <= MAX_SEED - n, f"{where}seed must be between 0 and {MAX_SEED}, got {line_seed}")
        check(1 <= n <= 10000, f"{where}num-images must be between 1 and 10000, got {n}")
        settings = replace(base, **over)
        validate(settings, where)
        for image in init_images:
            jobs += [Job(prompt, line_seed + k, settings, image) for k in range(n)]
    return jobs
