#!/usr/bin/env bash
# The README's textual-inversion pictures, made on a CPU with the commands users run:
#   bash recipes/tiny-emoji/demo_inversion.sh .data/emoji.npz docs/embedded
# 21 images of "maple leaf" (a held-out name: the embedded model never saw it) in three styles, captioned
# with a new token mapleleaf; `ldm train --textual-inversion` learns that token's embedding (the model
# stays frozen); before (the name as words) and after (the token, with --embedding).
set -euo pipefail
NPZ=$1; OUT=$2; W=$(mktemp -d)
LDM=${LDM:-.venv/bin/ldm}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
$PY - "$NPZ" "$W" <<'PYEOF'
import sys
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, "recipes/tiny-emoji")
from emoji_data import BG_NAMES, compose, load
from PIL import Image
d, w = load(Path(sys.argv[1])), Path(sys.argv[2])
(w / "maple").mkdir()
k = 0
for i in [i for i, n in enumerate(d["name"]) if n == "maple leaf"]:
    for bg in range(7):
        x = compose(torch.from_numpy(d["rgba"][[i]]), torch.tensor([bg]))
        im = Image.fromarray(((x[0] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())
        im.save(w / "maple" / f"{k:02d}.png")
        (w / "maple" / f"{k:02d}.txt").write_text(f"mapleleaf, {d['style'][i]} style, on a {BG_NAMES[bg]} background")
        k += 1
print(f"{k} images of maple leaf")
PYEOF
$LDM sample "maple leaf, flat style, on a blue background" -n 4 --seed 5 -o "$W/before" -q --grid
$LDM train "$W/maple" --out "$W/run" --textual-inversion mapleleaf --init-word leaf --vectors ${TI_VECTORS:-2} \
  --batch-size 4 --max-steps ${TI_STEPS:-400} --device cpu -q --cache-dir "$W/cache"
$LDM sample "mapleleaf, flat style, on a blue background" -n 4 --seed 5 -o "$W/after" -q --grid \
  --embedding "$W/run/embedding/mapleleaf.safetensors"
cp "$W"/before/*grid*.png "$OUT/maple-before.png"; cp "$W"/after/*grid*.png "$OUT/maple-after.png"
cp "$W/maple/00.png" "$OUT/maple-real.png"
cp "$W/run/embedding/mapleleaf.safetensors" "$W/maple.safetensors"
$PY -c "
from diffusers import StableDiffusionPipeline; from ldm_cli.models.defaults import default_model
p = StableDiffusionPipeline.from_pretrained(default_model(), safety_checker=None, requires_safety_checker=False)
p.load_textual_inversion('$W/maple.safetensors', token='mapleleaf'); print('diffusers loads it:', p.tokenizer.tokenize('mapleleaf'))"
echo "pictures in $OUT"
