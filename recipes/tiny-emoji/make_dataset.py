"""Build the emoji dataset of the embedded model from three openly licensed npm packages.

    python recipes/tiny-emoji/make_dataset.py WORK_DIR        # needs `npm` (the npm registry)

Writes WORK_DIR/emoji.npz: RGBA emoji at 48x48 (uint8), one row per (emoji, style), with their names,
keywords, styles and a held-out flag; the backgrounds are composed at training time (compose.py).
Styles and sources (licences checked in the files each package ships; see ATTRIBUTION.md):
  cartoon  emoji-datasource-google 16.0.0   Noto Emoji images (Apache-2.0), emoji-data (MIT)
  flat     emoji-datasource-twitter 16.0.0  Twemoji images (CC-BY-4.0), emoji-data (MIT)
  3d       @lobehub/fluent-emoji-3d 1.1.0   Microsoft Fluent Emoji 3D (MIT)
About 5% of emoji names (every style of them) are held out for evaluation, chosen by a hash of the
name so that the split never changes.
"""

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

PACKAGES = {"cartoon": "emoji-datasource-google@16.0.0", "flat": "emoji-datasource-twitter@16.0.0",
            "3d": "@lobehub/fluent-emoji-3d@1.1.0"}
SIZE = 48
HELD_OUT_PERCENT = 5
SKIP_CATEGORIES = {"Flags", "Component"}  # ~270 near-identical flags; skin-tone swatches


def fetch(spec: str, work: Path) -> tarfile.TarFile:
    out = subprocess.run(["npm", "pack", spec, "--pack-destination", str(work), "--json"], check=True,
                         capture_output=True, text=True, cwd=work).stdout
    return tarfile.open(work / json.loads(out)[0]["filename"])


def held_out(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def to_rgba(data: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(data)).convert("RGBA")
    im = im.resize((SIZE, SIZE), Image.LANCZOS)
    return np.asarray(im, dtype=np.uint8)


def main(work: Path) -> None:
    work = work.resolve()  # npm runs inside it: a relative --pack-destination would point below itself
    work.mkdir(parents=True, exist_ok=True)
    tars = {style: fetch(spec, work) for style, spec in PACKAGES.items()}
    meta = json.load(tars["cartoon"].extractfile("package/emoji.json"))
    files = {style: {Path(m.name).name: m for m in t.getmembers() if m.isfile()} for style, t in tars.items()}
    pixels, names, keywords, styles, held = [], [], [], [], []
    for e in sorted(meta, key=lambda e: e["sort_order"]):
        if e["category"] in SKIP_CATEGORIES or not e.get("name"):
            continue
        name = e["name"].lower().replace("_", " ")
        words = sorted({s.replace("_", " ") for s in e["short_names"]} - {name})
        for style in PACKAGES:
            file = e["image"] if style != "3d" else e["image"].replace(".png", ".webp")
            member = files[style].get(file)
            if style != "3d" and not e.get(f"has_img_{'google' if style == 'cartoon' else 'twitter'}"):
                continue
            if member is None:
                continue
            pixels.append(to_rgba(tars[style].extractfile(member).read()))
            names.append(name)
            keywords.append(", ".join(words))
            styles.append(style)
            held.append(held_out(name))
    np.savez_compressed(work / "emoji.npz", rgba=np.stack(pixels), name=np.array(names), keywords=np.array(keywords),
                        style=np.array(styles), held_out=np.array(held))
    n_names = len(set(names))
    print(f"{len(pixels)} images of {n_names} emoji names in {len(PACKAGES)} styles; held out "
          f"{len(set(n for n, h in zip(names, held) if h))} names ({sum(held)} images)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
