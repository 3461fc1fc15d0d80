#!/usr/bin/env bash
# Rebuild the embedded model end to end (the GPU part of `make embedded-model`).
#   bash recipes/tiny-emoji/run.sh WORK_DIR [UNET_SECONDS]
# Needs WORK_DIR/emoji.npz from make_dataset.py (which needs npm). Writes WORK_DIR/embedded (fp16),
# which `make embedded-model` copies to ldm_cli/embedded, and WORK_DIR/judge.pt + embedded_judge.jsonl (the
# independent judge's scores, bench/embedded_judge.py).
# Data: SCENES_PER_KIND composed scenes of each kind (scenes.py: single emoji, wearing, pairs, counts,
# places). SCENES_PER_KIND=0 gives the first edition's data (single emoji on plain colours, export_folder.py;
# its short-caption second stage was finetune.sh). SINGLE_BACKGROUNDS=K adds the first edition's data to the scenes:
# every training emoji on K plain colours, half of them in the full caption form (export_folder.py).
# MORE_WEARERS=1: wearing scenes also of 24 smiley faces (scenes.py --more-wearers): every accessory on twice the
# wearers, a lever against memorising each (wearer, accessory) pair; the judge's prompts stay the same.
# COMPILE=auto|none|regional|full|graphs: ldm train's --compile for the U-Net (default graphs: this U-Net's steps at
# batch 256 are 3.2x faster than with full on an H100, its EMA, validation grids, checkpoints and resume run under
# it, docs/performance.md; on a CPU it is the plain step).
# BATCH, LR, WARMUP, EMA_DECAY, PRECISION (no on a CPU: bf16 is no faster there), CHECKPOINT_EVERY, LOG_EVERY: ldm
# train's settings for the U-Net (defaults: the GPU run's).
# UNET_CONFIG=FILE trains another U-Net shape than unet.json (the shipped weights must stay <= 60 MB in all).
# FROM=MODEL_DIR (absolute) goes on from a model an earlier run made (its fp16 folder, clip_image_tower in it):
# its VAE, tokenizer and text encoder are kept (the data stage only composes the scenes) and its U-Net trains on
# with a fresh optimizer: training spread over several sessions of GPU time, each adding its steps.
# STAGES picks what runs, in order (default all: "data unet final"): data = scenes, tokenizer, VAE, CLIP, the
# base model; unet = the U-Net for at most UNET_SECONDS (resumed from WORK_DIR's last checkpoint if there is
# one); final = the fp16 model folder from the last checkpoint, and the judge's scores. gpu_call.sh runs them
# over several device calls.
set -euo pipefail
stamp() { echo "[$(date +%T)] $*"; }
W=$1
T=${2:-1800}
R=$(cd "$(dirname "$0")" && pwd)
LDM="python3 -m ldm_cli"
N=${SCENES_PER_KIND:-20000}
STAGES=${STAGES:-data unet final}
has() { [[ " $STAGES " == *" $1 "* ]]; }
SCENES=(); [ "$N" -gt 0 ] && SCENES=(--scenes "$W/data")
cd "$R"
if has data; then
if [ "$N" -gt 0 ]; then
  MORE=(); [ "${MORE_WEARERS:-0}" = 1 ] && MORE=(--more-wearers)
  stamp "scenes.py"; python3 scenes.py "$W/emoji.npz" "$W/data" --per-kind "$N" "${MORE[@]}"
  if [ "${SINGLE_BACKGROUNDS:-0}" -gt 0 ]; then  # the first edition's data beside the scenes (its caption form kept)
    stamp "export_folder.py"; python3 export_folder.py "$W/emoji.npz" "$W/data" --backgrounds "$SINGLE_BACKGROUNDS"
  fi
  TOK_SCENES=("$W/data")
else
  stamp "export_folder.py"; python3 export_folder.py "$W/emoji.npz" "$W/data"
  TOK_SCENES=()
fi
if [ -z "${FROM:-}" ]; then  # else FROM's tokenizer, VAE and text encoder
stamp "make_tokenizer.py"; python3 make_tokenizer.py "$W/emoji.npz" "$W/tokenizer" "${TOK_SCENES[@]}"
stamp "train_vae.py"; python3 train_vae.py "$W/emoji.npz" "$W/vae" --steps "${VAE_STEPS:-3000}" --batch "${VAE_BATCH:-128}" --max-seconds "${VAE_SECONDS:-600}" "${SCENES[@]}"
stamp "train_clip.py"; python3 train_clip.py "$W/emoji.npz" "$W/tokenizer" "$W/clip" --steps "${CLIP_STEPS:-4000}" --batch "${CLIP_BATCH:-512}" --max-seconds "${CLIP_SECONDS:-600}" "${SCENES[@]}"
stamp "assemble.py"; python3 assemble.py base "$W/vae" "$W/clip" "$W/tokenizer" "$W/base"
fi
fi
cd - >/dev/null
# The U-Net, trained by ldm itself, for at most T seconds: SIGTERM makes ldm checkpoint and stop,
# and a resume with --max-steps at that step writes the final folders.
NEW=(--from-scratch --unet-config "${UNET_CONFIG:-$R/unet.json}"); [ -n "${FROM:-}" ] && NEW=()
ARGS=("$W/data" --model "${FROM:-$W/base}" --out "$W/unet-run" "${NEW[@]}"
      --resolution 64 --batch-size "${BATCH:-256}" --lr "${LR:-4e-4}" --warmup-steps "${WARMUP:-200}" --min-snr-gamma 5
      --ema --ema-decay "${EMA_DECAY:-0.999}" --mixed-precision "${PRECISION:-bf16}" --log-every "${LOG_EVERY:-100}"
      --checkpoint-every "${CHECKPOINT_EVERY:-2000}" --cache-dir "$W/cache"
      --compile "${COMPILE:-graphs}"
      --validate-every 1000 --validation-prompt "a cat wearing a top hat"
      --validation-prompt "an apple on the left and a banana on the right")
GO_ON=(); ls "$W/unet-run/checkpoints" 2>/dev/null | grep -q step- && GO_ON=(--resume latest)
if has unet; then
  stamp "unet"; timeout -s TERM "$T" $LDM train "${ARGS[@]}" --max-steps "${UNET_STEPS:-100000}" "${GO_ON[@]}" || true
fi
has final || exit 0
# a run stopped by its time limit: its last checkpoint's step becomes the last step, which writes the folders
# (ldm rewrites folders older than that checkpoint, after a later call trained on; leaves current ones alone)
LAST=$(ls "$W/unet-run/checkpoints" | sort | tail -1); STEP=$(echo "$LAST" | sed 's/step-0*//')
$LDM train "${ARGS[@]}" --max-steps "$STEP" --resume latest
TOWER=$W/clip; [ -n "${FROM:-}" ] && TOWER=$FROM/clip_image_tower
stamp "final"; python3 "$R/assemble.py" final "$W/unet-run/model-ema" "$TOWER" "$W/embedded"
if [ "$N" -gt 0 ] && [ "${JUDGE_PROMPTS:-200}" -gt 0 ]; then  # JUDGE_PROMPTS=0: scored elsewhere (on a CPU)
  if [ ! -f "$W/judge.pt" ]; then  # a judge trained before (e.g. on a CPU) is kept
    stamp "judge"; python3 "$R/judge.py" "$W/emoji.npz" "$W/judge.pt" --images "${JUDGE_IMAGES:-30000}" --epochs "${JUDGE_EPOCHS:-8}"
  fi
  python3 "$R/../../bench/embedded_judge.py" "$W/emoji.npz" --judge "$W/judge.pt" --model "$W/embedded" --out "$W" \
    --prompts "${JUDGE_PROMPTS:-200}"
fi
