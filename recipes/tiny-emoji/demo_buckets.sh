#!/usr/bin/env bash
# The README's bucketing pictures: the embedded model fine-tuned on 24 wide (2:1) pictures of three balls in
# a row, once with aspect-ratio buckets (the default for such a folder) and once centre-cropped to squares
# (--buckets off), then asked for the same prompt at a wide size (88x40, the 2:1 bucket). CPU, a few minutes:
#   bash recipes/tiny-emoji/demo_buckets.sh docs/embedded
set -euo pipefail
OUT=$1; W=$(mktemp -d)
LDM=${LDM:-.venv/bin/ldm}
PY=${PY:-.venv/bin/python}
STEPS=${BUCKET_STEPS:-300}
mkdir -p "$OUT"
$PY - "$W/balls" <<'PYEOF'
import random, sys
from pathlib import Path
from PIL import Image, ImageDraw
root = Path(sys.argv[1]); root.mkdir()
colours = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30)}
rng = random.Random(0)
for i in range(24):
    names = rng.sample(sorted(colours), 3)
    im = Image.new("RGB", (128, 64), "white")
    for k, name in enumerate(names):  # three balls spread over the whole width
        cx, cy, r = 22 + 42 * k + rng.randint(-3, 3), 32 + rng.randint(-3, 3), 17
        ImageDraw.Draw(im).ellipse((cx - r, cy - r, cx + r, cy + r), fill=colours[name])
    im.save(root / f"{i:02d}.png")
    (root / f"{i:02d}.txt").write_text(f"{names[0]} ball, {names[1]} ball and {names[2]} ball in a row, on a white background")
PYEOF
P="red ball, green ball and blue ball in a row, on a white background"
for mode in on off; do
  $LDM train "$W/balls" --out "$W/run-$mode" --resolution 64 --batch-size 4 --max-steps "$STEPS" --lr 5e-4 \
    --buckets $mode --device cpu --cache-dir "$W/cache"
  $LDM sample "$P" -n 4 --seed 5 --width 88 --height 40 -o "$W/after-$mode" -q --grid --model "$W/run-$mode/model"
done
cp "$W"/after-on/*grid*.png "$OUT/buckets-on.png"; cp "$W"/after-off/*grid*.png "$OUT/buckets-off.png"
cp "$W/balls/00.png" "$OUT/buckets-real.png"
echo "pictures in $OUT"
