#!/usr/bin/env bash
# The embedded model's U-Net trained on the composed scenes on a CPU, a few hours at a time (no GPU).
#   bash recipes/tiny-emoji/cpu_train.sh WORK_DIR SECONDS        # WORK_DIR/emoji.npz from make_dataset.py
#   STAGES=final bash recipes/tiny-emoji/cpu_train.sh WORK_DIR   # WORK_DIR/embedded from the last checkpoint
# It goes on from a model (FROM, default the shipped one): its VAE, tokenizer and text encoder are kept, its
# U-Net trains on SCENES_PER_KIND (6000) scenes of each kind, fp32 (bf16 autocast is no faster on a CPU,
# even with AMX: 41-44 against 46-49 images/s measured on 2 cores), batch 128, lr 2e-4, EMA 0.998,
# a checkpoint every 250 steps. Each call resumes from WORK_DIR's last checkpoint, so the training can
# span several sittings; the first call also composes the scenes and fills the latent cache (~7 minutes
# on 2 cores). On 2 cores: ~2.8 s a step (45 images/s).
set -euo pipefail
R=$(cd "$(dirname "$0")" && pwd)
W=$(mkdir -p "$1" && cd "$1" && pwd)
[ -d "$W/data" ] && DEFAULT_STAGES="unet final" || DEFAULT_STAGES="data unet final"
FROM=${FROM:-$(cd "$R/../.." && pwd)/ldm_cli/embedded} SCENES_PER_KIND=${SCENES_PER_KIND:-6000} \
  COMPILE=none PRECISION=no BATCH=${BATCH:-128} LR=${LR:-2e-4} WARMUP=${WARMUP:-100} EMA_DECAY=${EMA_DECAY:-0.998} \
  CHECKPOINT_EVERY=250 LOG_EVERY=25 JUDGE_PROMPTS=0 STAGES=${STAGES:-$DEFAULT_STAGES} \
  bash "$R/run.sh" "$W" "${2:-3600}"
