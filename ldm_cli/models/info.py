"""`ldm info`: facts about a loaded model."""

from pathlib import Path

from ldm_cli.models import runs
from ldm_cli.models.components import Components

FAMILIES = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "Stable Diffusion XL", "sdxl-refiner": "Stable Diffusion XL refiner"}


def describe(c: Components) -> dict:
    def params(m):
        return sum(p.numel() for p in m.parameters())

    from ldm_cli.io.metadata import EMBEDDED
    from ldm_cli.models.defaults import EMBEDDED_MODEL, TRAIN_KINDS, model_defaults, train_lr

    path = EMBEDDED_MODEL if c.name == EMBEDDED else runs.product(Path(c.name), "model")  # a run: its model/
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else (
        path.stat().st_size if path.is_file() else None)
    def encoder(te, tok):
        if te is None:
            return None
        return (f"{type(te).__name__}, {params(te):,} parameters, hidden size {te.config.hidden_size}; "
                f"{type(tok).__name__}, max length {tok.model_max_length}")

    return {
        "model": c.name,
        "family": c.family,
        "family_name": FAMILIES[c.family],
        "unet": f"{type(c.unet).__name__}, {params(c.unet):,} parameters, sample size {c.unet.config.sample_size}",
        "vae": f"{type(c.vae).__name__}, {params(c.vae):,} parameters, scale {c.vae_scale}, "
               f"scaling factor {c.vae.config.scaling_factor}",
        "text_encoder": encoder(c.text_encoder, c.tokenizer),
        **({"text_encoder_2": encoder(c.text_encoder_2, c.tokenizer_2)} if c.text_encoder_2 is not None else {}),
        "native_size": f"{c.unet.config.sample_size * c.vae_scale}px",
        "scheduler": {k: v for k, v in c.scheduler_config.items() if k in (
            "_class_name", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type",
            "timestep_spacing", "steps_offset", "set_alpha_to_one", "clip_sample")},
        "prediction_type": c.schedule.prediction_type,
        "dtype": str(c.unet.dtype).replace("torch.", ""),
        "size_on_disk_bytes": size,
        "sampling_defaults": model_defaults(str(path)) or None,  # ldm_defaults.json: what sample/img2img start from
        "training_lr": {k: lr for k in TRAIN_KINDS if (lr := train_lr(str(path), k))} or None,  # and ldm train
    }
