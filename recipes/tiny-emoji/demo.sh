#!/usr/bin/env bash
# The README's pictures of the embedded model, made on a CPU with the commands users run:
#   bash recipes/tiny-emoji/demo.sh .data/emoji.npz docs/embedded
# 1. three prompts; 2. img2img: a flat-style cat turned 3d, then blue background;
# 3. `ldm train` on 20 images of "ghost" (a held-out name: never trained on), before/after.
set -euo pipefail
NPZ=$1; OUT=$2; W=$(mktemp -d)
LDM=${LDM:-.venv/bin/ldm}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
$LDM sample "cat face, 3d style, on a blue background" "red apple, flat style, on a white background" \
  "rocket, cartoon style, on a black background" --seed 1 -o "$W/three" -q --grid
cp "$W"/three/*grid*.png "$OUT/three-prompts.png"
$PY - "$NPZ" "$W" <<'PYEOF'
import sys
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, "recipes/tiny-emoji")
from emoji_data import BG_NAMES, caption, compose, load
from PIL import Image
d, w = load(Path(sys.argv[1])), Path(sys.argv[2])
def save(i, bg, path, text=None):
    x = compose(torch.from_numpy(d["rgba"][[i]]), torch.tensor([bg]))
    Image.fromarray(((x[0] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(path)
    if text: Path(path).with_suffix(".txt").write_text(text)
cat = [i for i, (n, s) in enumerate(zip(d["name"], d["style"])) if n == "cat face" and s == "flat"][0]
save(cat, 0, w / "cat-flat-white.png")
(w / "ghost").mkdir()
ghosts = [i for i, n in enumerate(d["name"]) if n == "ghost"]
k = 0
for i in ghosts:
    for bg in range(len(BG_NAMES)):
        if k < 20:
            save(i, bg, w / "ghost" / f"{k:02d}.png", caption("ghost", d["style"][i], BG_NAMES[bg]))
            k += 1
PYEOF
$LDM img2img "$W/cat-flat-white.png" "cat face, 3d style, on a white background" --strength 0.85 --seed 2 \
  -o "$W/i2i" -q
# seed 3: seed 2 keeps the white background with the second edition (5 of seeds 0-5 turn blue at 0.9)
$LDM img2img "$W/cat-flat-white.png" "cat face, flat style, on a blue background" --strength 0.9 --seed 3 \
  -o "$W/i2i" -q
$PY -c "
from PIL import Image; import glob, sys
ims = [Image.open(p) for p in ['$W/cat-flat-white.png'] + sorted(glob.glob('$W/i2i/*.png'))]
g = Image.new('RGB', (64 * len(ims), 64)); [g.paste(im, (64 * k, 0)) for k, im in enumerate(ims)]; g.save('$OUT/img2img.png')"
P="ghost, 3d style, on a blue background"
$LDM sample "$P" -n 4 --seed 5 -o "$W/before" -q --grid
$LDM train "$W/ghost" --out "$W/ghost-run" --resolution 64 --batch-size 4 --max-steps ${GHOST_STEPS:-300} --lr ${GHOST_LR:-5e-4} \
  --device cpu -q --cache-dir "$W/cache"
$LDM sample "$P" -n 4 --seed 5 -o "$W/after" -q --grid --model "$W/ghost-run/model"
cp "$W"/before/*grid*.png "$OUT/ghost-before.png"; cp "$W"/after/*grid*.png "$OUT/ghost-after.png"
cp "$W/ghost/00.png" "$OUT/ghost-real.png"
echo "pictures in $OUT"
