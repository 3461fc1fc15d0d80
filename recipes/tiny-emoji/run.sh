#!/usr/bin/env bash
# Rebuild the embedded model end to end (the GPU part of `make embedded-model`).
#   bash recipes/tiny-emoji/run.sh WORK_DIR [UNET_SECONDS]
# Needs WORK_DIR/emoji.npz from make_dataset.py (which needs npm). Writes WORK_DIR/embedded (fp16),
# which `make embedded-model` copies to ldm_cli/embedded.
set -euo pipefail
stamp() { echo "[$(date +%T)] $*"; }
W=$1
T=${2:-1800}
R=$(cd "$(dirname "$0")" && pwd)
LDM="python3 -m ldm_cli"
cd "$R"
stamp "make_tokenizer.py"; python3 make_tokenizer.py "$W/emoji.npz" "$W/tokenizer"
stamp "train_vae.py"; python3 train_vae.py "$W/emoji.npz" "$W/vae" --steps "${VAE_STEPS:-3000}" --batch "${VAE_BATCH:-128}" --max-seconds "${VAE_SECONDS:-600}"
stamp "train_clip.py"; python3 train_clip.py "$W/emoji.npz" "$W/tokenizer" "$W/clip" --steps "${CLIP_STEPS:-4000}" --batch "${CLIP_BATCH:-512}" --max-seconds "${CLIP_SECONDS:-600}"
stamp "export_folder.py"; python3 export_folder.py "$W/emoji.npz" "$W/data"
stamp "assemble.py"; python3 assemble.py base "$W/vae" "$W/clip" "$W/tokenizer" "$W/base"
cd - >/dev/null
# The U-Net, trained by ldm itself, for at most T seconds: SIGTERM makes ldm checkpoint and stop,
# and a resume with --max-steps at that step writes the final folders.
ARGS=("$W/data" --model "$W/base" --out "$W/unet-run" --from-scratch --unet-config "$R/unet.json"
      --resolution 64 --batch-size "${BATCH:-256}" --lr "${LR:-4e-4}" --warmup-steps 200 --min-snr-gamma 5
      --ema --ema-decay 0.999 --mixed-precision bf16 --log-every 100 --checkpoint-every 2000 --cache-dir "$W/cache"
      --validate-every 1000 --validation-prompt "cat face, 3d style, on a blue background"
      --validation-prompt "red apple, flat style, on a white background")
stamp "unet"; timeout -s TERM "$T" $LDM train "${ARGS[@]}" --max-steps "${UNET_STEPS:-100000}" || true
STEP=$(ls "$W/unet-run/checkpoints" | sort | tail -1 | sed 's/step-0*//')
$LDM train "${ARGS[@]}" --max-steps "$STEP" --resume latest
stamp "final"; python3 "$R/assemble.py" final "$W/unet-run/model-ema" "$W/clip" "$W/embedded"
