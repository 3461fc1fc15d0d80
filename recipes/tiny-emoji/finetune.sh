#!/usr/bin/env bash
# Second stage of the shipped model: fine-tune the model that run.sh made (MODEL, fp16 folder) on the
# export with short-caption variants, so that "a cat face" works as well as the full caption form.
#   bash recipes/tiny-emoji/finetune.sh emoji.npz MODEL WORK_DIR SECONDS
set -euo pipefail
NPZ=$1; MODEL=$2; W=$3; T=$4
R=$(cd "$(dirname "$0")" && pwd)
LDM="python3 -m ldm_cli"
python3 "$R/export_folder.py" "$NPZ" "$W/data6" --backgrounds 6
ARGS=("$W/data6" --model "$MODEL" --out "$W/ft-run" --resolution 64 --batch-size 256 --lr 1e-4 --warmup-steps 100
      --min-snr-gamma 5 --ema --ema-decay 0.999 --mixed-precision bf16 --log-every 100 --checkpoint-every 2000
      --cache-dir "$W/cache" -q)
timeout -s TERM "$T" $LDM train "${ARGS[@]}" --max-steps 100000 || true
STEP=$(ls "$W/ft-run/checkpoints" | sort | tail -1 | sed 's/step-0*//')
$LDM train "${ARGS[@]}" --max-steps "$STEP" --resume latest
python3 "$R/assemble.py" final "$W/ft-run/model-ema" "$MODEL/clip_image_tower" "$W/embedded"
