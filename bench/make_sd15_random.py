"""Save an SD-1.5-shaped model with random weights (fp16) as a diffusers folder, for timing the CLI.

    python bench/make_sd15_random.py /tmp/sd15
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from gpu_sample import SCHED, build  # noqa: E402
from tiny import write_tokenizer  # noqa: E402


def main(out: Path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    unet, vae, text = build("cpu", torch.float16)
    tok = write_tokenizer(out.parent / (out.name + "-tok"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler.from_config(SCHED), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
