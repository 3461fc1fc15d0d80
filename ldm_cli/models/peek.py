"""`ldm info` on what is not a model: a LoRA or textual-inversion file (told from its tensors' names and shapes,
read without loading a model or a weight), a picture's generation settings (ldm's or A1111's text chunk), an
`ldm train` run folder (its product). Returns None for anything else: a model, described by info.describe."""

import json
from pathlib import Path

from ldm_cli.errors import LdmError
from ldm_cli.models import runs

IMAGES = (".png", ".jpg", ".jpeg", ".webp")
WIDTHS = {768: "Stable Diffusion 1.x (CLIP ViT-L, 768)", 1024: "Stable Diffusion 2.x (OpenCLIP ViT-H, 1024)"}
LORA_DOWN = ("lora_down.weight", "lora_A.weight", "lora.down.weight")  # kohya, peft/diffusers, diffusers' old form


def peek(target: str) -> dict | None:
    from ldm_cli.models.lora import WEIGHT_NAME, lora_file

    path = Path(target).expanduser()
    if runs.is_run(path):
        made = [k for k in runs.OPTION if (path / k).is_dir()]
        if made[:1] == ["model"]:
            return None  # described as models are
        facts = {"run": str(path), "made": f"{made[0]} ({path / made[0]})" if made else "nothing yet (not ended)",
                 "checkpoints": len(list((path / "checkpoints").glob("step-*")))}
        product = {"lora": lambda: lora_file(str(path)), "embedding": lambda: runs.product(path, "embedding")}
        return {**facts, **(weights(product[made[0]]()) or {})} if made else facts
    if path.is_dir() and (path / WEIGHT_NAME).is_file():
        return weights(path / WEIGHT_NAME)
    if path.is_file() and path.suffix.lower() in IMAGES:
        return picture(path)
    if path.is_file() and path.suffix.lower() == ".safetensors":
        return weights(path)
    return None


def weights(path: Path) -> dict | None:
    """A LoRA's or an embedding's facts from the file's header (names and shapes), or None (a checkpoint)."""
    from safetensors import safe_open

    from ldm_cli.models.embeddings import default_token
    from ldm_cli.models.lora import file_hash

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 (safetensors raises its own types for damaged files)
        raise LdmError(f"{path}: not a valid .safetensors file ({str(e).splitlines()[0][:160]})") from None
    common = {"file": str(path), "size_on_disk_bytes": path.stat().st_size, "sha256_10": file_hash(path)}
    downs = {k: s for k, s in shapes.items() if k.endswith(LORA_DOWN)}
    if downs:
        unet = sum(1 for k in downs if "unet" in k or k.startswith(("down_blocks", "up_blocks", "mid_block")))
        kohya = any(k.startswith(("lora_unet_", "lora_te")) for k in downs)
        return {"kind": "LoRA", "format": "kohya (A1111)" if kohya else "diffusers / peft",
                "modules": len(downs), "u_net_modules": unet, "text_encoder_modules": len(downs) - unet,
                "rank": ", ".join(str(r) for r in sorted({s[0] for s in downs.values()})),
                "alpha_stored": any(k.endswith(".alpha") for k in shapes),
                "use": f"ldm sample PROMPT --model MODEL --lora {path}[:SCALE]", **common}
    sdxl = sorted(shapes) == ["clip_g", "clip_l"]
    if not (len(shapes) == 1 or sdxl) or any(len(s) not in (1, 2) for s in shapes.values()):
        return None  # a checkpoint, or no file of ours
    shape = next(iter(shapes.values()))
    vectors, width = shape if len(shape) == 2 else (1, shape[0])
    token = default_token(path)  # as --embedding names it
    family = "Stable Diffusion XL (clip_l 768 + clip_g 1280)" if sdxl else WIDTHS.get(
        width, f"a text encoder of width {width}")
    return {"kind": "textual-inversion embedding", "token": token, "vectors": vectors, "for": family,
            "use": f"ldm sample \"a photo of {token}\" --model MODEL --embedding {path}", **common}


def picture(path: Path) -> dict:
    """The settings a picture records: ldm's JSON chunk, A1111's `parameters` text, and whether --from-png
    can redo it."""
    from PIL import Image

    from ldm_cli.io.metadata import MAX_METADATA_BYTES, read_png_job

    try:
        with Image.open(path) as im:
            chunks = dict(getattr(im, "text", {}) or {})
            size = im.size
    except Exception as e:  # noqa: BLE001 (PIL raises many types for a damaged file)
        raise LdmError(f"{path}: cannot read the image ({str(e).splitlines()[0][:160]})") from None
    facts = {"file": str(path), "size": f"{size[0]}x{size[1]}"}
    ldm, a1111 = chunks.get("ldm"), chunks.get("parameters")
    if ldm and len(ldm) <= MAX_METADATA_BYTES:
        try:
            facts["ldm"] = json.loads(ldm)
        except json.JSONDecodeError:
            facts["ldm"] = "damaged (not JSON)"
    if a1111:
        facts["parameters"] = a1111[:MAX_METADATA_BYTES]
    if not ldm and not a1111:
        facts["settings"] = "none recorded (no ldm or A1111 text chunk)"
        return facts
    try:
        read_png_job(path)
        facts["redo"] = f"ldm sample --from-png {path}"
    except LdmError as e:
        facts["redo"] = f"not with --from-png: {e}"
    return facts
