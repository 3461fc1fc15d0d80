#!/usr/bin/env bash
# How the embedded model is built on the GPU machine, over back-to-back device calls (no network there; a call
# is at most 10 minutes; the machine stays warm, /tmp/emoji and the U-Net's process with it, while calls follow
# each other). Each call carries .whl (bench/offline_wheels.sh: diffusers, typer, pydantic, ... for Python 3.12); the first also
# .data/emoji.npz (from make_dataset.py) and, when there is one, .data/judge.pt (judge.py, trained on a CPU
# beforehand; else the recipe trains it).
#   bash recipes/tiny-emoji/gpu_call.sh probe          (optional, ~8 min) ldm train's step for this U-Net with
#       --compile none, full and graphs, and full at batch 1024 (bench/train_step.py --part small), CUDA-graphed
#       training against eager (tests/test_gpu.py); it fills inductor's cache, so the run's own compile is quick;
#       pick COMPILE and BATCH from it
#   [COMPILE=full] VAE_SECONDS=60 CLIP_SECONDS=60 bash recipes/tiny-emoji/gpu_call.sh start 560
#       data, tokenizer, VAE, CLIP, base model; then the U-Net in its own process session (it outlives the
#       call), this call watching it until 560 s have passed. The settings given here hold for the later calls.
#       From scratch (no FROM) the base model comes back (base16.tar.part-*: VAE, tokenizer, text encoder, image
#       tower in fp16, the U-Net's config only, 19 MB): with a returned EMA it makes the model folder here
#       FROM=.data/from (carried: an earlier run's returned model folder) trains that model on instead of a new
#       one: the data stage only composes the scenes (run.sh says more)
#   bash recipes/tiny-emoji/gpu_call.sh watch 580      the U-Net goes on; the call shows its log
#   bash recipes/tiny-emoji/gpu_call.sh finish 300     the U-Net for 300 s more, then SIGTERM (ldm checkpoints
#       and stops), the fp16 model folder (the judge scores it on a CPU after: bench/embedded_judge.py, run.sh's
#       last lines). Give the call at least 300 + 250 s: after the
#       stop, the final stage took ~130 s to reach assembling for 160,000 pictures (the resume that writes the
#       folders; it no longer reads the latent cache), then the fp16 folder and the tar. Before that stage the
#       last checkpoint's EMA comes back in fp16 (ema16.part-*, dropped once the folder is made): a call cut in
#       the final stage still returns the training (assemble.py from-ema rebuilds the folder on any machine)
# Returns under $OUT: the model folder as tar parts, the logs, metrics and the last validation grid.
# Where a call's tree is limited to 64 MiB, the first call's (the repository, 42 MB, of it the shipped model 40 MB;
# .whl 11 MB; emoji.npz 15 MB) fits with docs/ (1.2 MB) moved aside for that call.
# With one call's time only: `bash gpu_call.sh start 400; bash gpu_call.sh finish 40` in one 590-s call (the U-Net
# stops ~440 s in; the final stage and the tar take the rest); at ~300 s to the first step that trains ~2 minutes.
#   bash recipes/tiny-emoji/gpu_call.sh stop 0         like finish, without the final stage: SIGTERM, then the last
#       checkpoint's EMA in fp16 and the logs, nothing else (seconds). `start 540; stop 0` in one call stops the U-Net
#       100 s later than `start 400; finish 40` (the final stage's time spent training; not yet run on a GPU, checked
#       here on a fake checkpoint); the model folder is then made here: cat ema16.part-* > e.safetensors;
#       python assemble.py from-ema e.safetensors .data/gpu/embedded OUT (the FROM model, or the returned base16
#       from scratch), and judged on the CPU
# Measured on one H100 (FROM=, SINGLE_BACKGROUNDS=6, 100,000 scenes): data 50 s, latent cache (198,600 entries)
# 258 s, first step 400 s after the U-Net's start (compile: full), then ~3,300 images/s at batch 256; `start 585`
# then `finish 430` trained 6,920 steps (the shipped second edition's GPU leg), 21 minutes of the machine.
# At BATCH=1024 (LR=3e-4, 150,000 scenes + SINGLE_BACKGROUNDS=2): latent cache 241,454 entries in 199 s, first step
# 373 s after the start, then 8,450-10,850 images/s (the step at 256 was host-bound): 3,849 steps in ~7 minutes.
# With MORE_WEARERS=1 (same settings): scenes 45 s, latent cache 245,617 entries in 224 s, first step 401 s, then
# ~9,000 images/s; `start 585` then `finish 330` (a 600-s call, which ended 480 s in) trained 3,491 steps and
# returned the model. Keep SINGLE_BACKGROUNDS=6: at 2 the old caption form (NAME, STYLE style, on a COLOUR
# background) got a sixteenth of the images and drew worse (tests/test_embedded.py failed until a CPU sitting).
# The shipped weights, from scratch (MORE_WEARERS=1 SCENES_PER_KIND=20000 SINGLE_BACKGROUNDS=6 BATCH=1024 LR=3e-4
# VAE_SECONDS=60 CLIP_SECONDS=60 JUDGE_PROMPTS=0): `start 555` (558 s: data, VAE, CLIP, base16 returned; the U-Net's
# latent cache of 201,370 entries in 96 s, first step 205 s after its start) then `stop 400` (408 s): 9,916 steps
# x 1024 at ~19,600 images/s; the folder assembled here with assemble.py from-ema (README, "The embedded model").
set -uo pipefail
START=$(date +%s)
SITE=${SITE:-/tmp/site}  # installed once: the running U-Net imports from there
[ -f $SITE/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target $SITE .whl/*.whl && touch $SITE/.installed; } || exit 1
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
W=${W:-/tmp/emoji}
# The recipe's settings (run.sh's variables) given to the start call hold for the later calls: they are kept in
# W/settings.env; a later call's own value of one wins. (A finish call without them once trained the judge on the
# GPU with run.sh's defaults and lost the model folder to the call's time limit.)
SETTINGS="SCENES_PER_KIND SINGLE_BACKGROUNDS MORE_WEARERS VAE_STEPS VAE_BATCH VAE_SECONDS CLIP_STEPS CLIP_BATCH
  CLIP_SECONDS UNET_CONFIG UNET_STEPS COMPILE BATCH LR WARMUP EMA_DECAY PRECISION CHECKPOINT_EVERY LOG_EVERY"
if [ "${1:-}" = start ]; then  # FROM is kept in W: later calls need it (the final stage), carried or not
  rm -rf $W/from; [ -n "${FROM:-}" ] && { mkdir -p $W && cp -r "$FROM" $W/from || exit 1; }
  mkdir -p $W && : > $W/settings.env
  for v in $SETTINGS; do [ -n "${!v:-}" ] && echo "$v=${!v}" >> $W/settings.env; done
else
  while IFS== read -r v value; do [ -z "${!v:-}" ] && export "$v=$value"; done < <(cat $W/settings.env 2>/dev/null)
fi
echo "settings: $(env | grep -E "^($(echo $SETTINGS | tr ' ' '|'))=" | sort | tr '\n' ' ')"
unset FROM; [ -d $W/from ] && export FROM=$W/from
RUN="bash $PWD/recipes/tiny-emoji/run.sh $W"
TRAIN="^python3 -m ldm_cli train"  # the U-Net's process (not the timeout around it)
until_s() { while [ $(( $(date +%s) - START )) -lt "$1" ] && pgrep -f "$TRAIN" >/dev/null; do sleep 5; done; }
unet_log() { grep -v -i "warn\|Writing model\|Loading weights\|Loading pipeline\|float32" $W/unet.log | tail -"${1:-12}"; }
case "${1:-}" in
  probe)
    timeout 480 python3 bench/train_step.py --part small --out $OUT 2>&1 | grep -v -i "warn\|float32" | tail -24
    timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py -k training -p no:cacheprovider 2>&1 | tail -4 ;;
  start)
    mkdir -p $W && cp .data/emoji.npz $W/ && { cp .data/judge.pt $W/ 2>/dev/null || true; }
    STAGES=data $RUN > $OUT/data.log 2>&1 || { tail -30 $OUT/data.log; exit 1; }
    grep -v -i "warn\|Writing model\|Loading weights" $OUT/data.log | tail -20
    STAGES=unet setsid nohup $RUN 100000 > $W/unet.log 2>&1 < /dev/null &
    if [ -z "${FROM:-}" ]; then  # this run's VAE, tokenizer and text encoder come back (fp16, the U-Net's weights
      # left out): with a checkpoint's EMA they make the model folder here, should a later call be cut
      python3 recipes/tiny-emoji/assemble.py final $W/base $W/clip $W/base16 > $W/base16.log 2>&1 &&
        tar cf - -C $W --exclude "base16/unet/*.safetensors" base16 | split -b 15M - $OUT/base16.tar.part- &&
        echo "the base model (VAE, tokenizer, text encoder, image tower) returned"
    fi
    sleep 10; until_s "${2:-560}"; unet_log 20 ;;
  watch)
    until_s "${2:-580}"; unet_log ;;
  stop|finish)
    until_s "${2:-300}"
    pkill -TERM -f "$TRAIN"; while pgrep -f "$TRAIN" >/dev/null; do sleep 2; done; unet_log 6
    # first the last checkpoint's EMA in fp16 (2 files): should the call be cut in the final stage, the model
    # is rebuilt from it here: cat ema16.part-* > e.safetensors; python assemble.py from-ema e.safetensors FROM OUT
    LAST=$(ls -d $W/unet-run/checkpoints/step-* | sort | tail -1)
    python3 recipes/tiny-emoji/assemble.py half $LAST/ema.safetensors $W/ema16.safetensors &&
      split -b 15M $W/ema16.safetensors $OUT/ema16.part- && echo "$(basename $LAST)'s EMA returned (fp16)"
    if [ "$1" = stop ]; then cp $W/unet.log $OUT/; tail -3 $W/unet-run/log.jsonl > $OUT/log_tail.jsonl; ls -la $OUT; exit 0; fi
    # the judge scores on a CPU afterwards (bench/embedded_judge.py): the call's time goes to returning the folder
    STAGES=final JUDGE_PROMPTS=0 $RUN > $OUT/final.log 2>&1; grep -v -i "warn\|Writing model\|Loading weights\|float32" $OUT/final.log | tail -16
    [ -f $W/embedded/model_index.json ] && rm -f $OUT/ema16.part-*  # at most 8 files come back
    tar cf - -C $W embedded | split -b 15M - $OUT/embedded.tar.part-
    # at most 8 files come back: the tar parts (3), the logs, one metrics file, the last validation grid
    cp $W/unet.log $OUT/
    cat $W/vae/metrics.json $W/clip/metrics.json $W/embedded_judge.jsonl $W/unet-run/log.jsonl > $OUT/metrics.txt 2>/dev/null
    ls $W/unet-run/validation 2>/dev/null | tail -1 | xargs -I{} cp $W/unet-run/validation/{} $OUT/validation-last.png ;;
  *) echo "usage: gpu_call.sh probe | start|watch|stop|finish SECONDS" >&2; exit 2 ;;
esac
ls -la $OUT
