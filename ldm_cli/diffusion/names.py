"""Sampler and sigma-schedule names: ours (`--sampler`, `--schedule`) and AUTOMATIC1111's (PNG
`parameters`). No torch here: jobs.py validates settings with these before any model loads."""

import difflib

from ldm_cli.errors import LdmError

# ours -> A1111's "Sampler:" name
SAMPLERS = {
    "ddim": "DDIM", "ddpm": "DDPM", "euler": "Euler", "euler-a": "Euler a", "heun": "Heun", "lms": "LMS",
    "dpm2": "DPM2", "dpm2-a": "DPM2 a", "dpm++2m": "DPM++ 2M", "dpm++2m-sde": "DPM++ 2M SDE",
    "dpm++2m-sde-heun": "DPM++ 2M SDE Heun", "dpm++3m-sde": "DPM++ 3M SDE", "unipc": "UniPC", "lcm": "LCM",
}
# ours -> A1111's "Schedule type:" name
SCHEDULES = {"default": "Automatic", "karras": "Karras", "exponential": "Exponential"}
SIGMA_SAMPLERS = ("euler", "euler-a", "heun", "lms", "dpm2", "dpm2-a", "dpm++2m", "dpm++2m-sde", "dpm++2m-sde-heun",
                  "dpm++3m-sde", "unipc")  # take --schedule
STOCHASTIC = ("ddpm", "euler-a", "dpm2-a", "dpm++2m-sde", "dpm++2m-sde-heun", "dpm++3m-sde",
              "lcm")  # draw fresh noise at each step

# A1111 samplers ldm lacks -> the nearest it has (same family and order)
NEAREST = {
    "dpm++ 2s a": "euler-a", "dpm++ sde": "dpm++2m-sde", "dpm fast": "dpm++2m",
    "dpm adaptive": "dpm++2m", "restart": "heun", "plms": "ddim", "deis": "unipc", "ipndm": "unipc",
    "ipndm_v": "unipc", "heun pp2": "heun", "euler cfg++": "euler", "euler a cfg++": "euler-a",
    "dpm++ 2m cfg++": "dpm++2m",
}


def from_a1111(sampler: str, schedule: str | None = None) -> tuple[str, str]:
    """(sampler, schedule) from A1111's `Sampler:` and `Schedule type:` values. Older A1111 wrote the
    schedule into the sampler name ("DPM++ 2M Karras"). Unknown names: LdmError naming the nearest."""
    name = sampler.strip()
    by_a1111 = {v.lower(): k for k, v in SAMPLERS.items()}
    suffix = next((k for k, v in SCHEDULES.items() if k != "default" and name.lower().endswith(" " + v.lower())), None)
    if suffix and schedule is None and name.lower().rsplit(" ", 1)[0] in by_a1111:
        name, schedule = name.rsplit(" ", 1)[0], SCHEDULES[suffix]
    ours = by_a1111.get(name.lower())
    if ours is None:
        near = NEAREST.get(name.lower().removesuffix(" karras").removesuffix(" exponential"))
        near = near or next(iter(difflib.get_close_matches(name.lower(), list(by_a1111), 1, 0.0)), None)
        near = near if near in SAMPLERS else by_a1111.get(near, "ddim")
        raise LdmError(f"sampler {sampler!r} is not one ldm has; the nearest is --sampler {near} "
                       f"(ldm has: {', '.join(SAMPLERS)})")
    by_type = {v.lower(): k for k, v in SCHEDULES.items()}
    kind = by_type.get((schedule or "Automatic").strip().lower())
    if kind is None:
        raise LdmError(f"schedule type {schedule!r} is not one ldm has; use --schedule "
                       f"{' / '.join(SCHEDULES)} ('default' keeps the model's spacing)")
    return ours, kind if ours in SIGMA_SAMPLERS else "default"
