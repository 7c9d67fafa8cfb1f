#!/usr/bin/env bash
# `make demo`, problem 3: ControlNet on Stable Diffusion v1.4 (Fill50k).
# Always: generates a small Fill50k-style set with p3_controlnet/make_fill50k.py (demo_out/p3_fill50k/).
# With SD_PATH=/path/to/sd-v1-4.ckpt (or a diffusers SD v1.x folder): uses the ControlNet at CONTROLNET
# (default checkpoints/controlnet); when there is none, trains a short demo one on the generated set first
# (P3_DEMO_STEPS steps, default 500: a few minutes on one GPU; on a CPU only with P3_DEMO_TRAIN=1, as it takes
# hours there). Then runs hw2_3.sh on the generated test split, scores the output with
# scripts/evaluate_controlnet.py, and draws the two-circle report figure.
# Without SD it says what is missing and exits 0. Nothing is downloaded.
# P3_DEMO_SIZE (default 512) is the resolution of the generated set and of the demo training.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh
OUT="${OUT:-demo_out}"
SD_PATH="${SD_PATH:-}"
CONTROLNET="${CONTROLNET:-checkpoints/controlnet}"
SIZE="${P3_DEMO_SIZE:-512}"
step() { "$PY" scripts/demo_step.py "$OUT" "$@"; }

echo "== P3: ControlNet on Stable Diffusion v1.4 (Fill50k) =="
step p3_data -- "$PY" p3_controlnet/make_fill50k.py --out "$OUT/p3_fill50k" --n 200 --n-test 20 --size "$SIZE" --seed 0
echo "Fill50k-style data: $OUT/p3_fill50k/{training,testing}/{source/,target/,prompt.json}"

missing=""
[ -n "$SD_PATH" ] || missing="SD_PATH is not set"
[ -z "$SD_PATH" ] || [ -e "$SD_PATH" ] || missing="SD_PATH=$SD_PATH does not exist"
if [ -n "$missing" ]; then
  echo "(P3 generation skipped: $missing)"
  step p3_generate --skip "$missing"
  echo "P3 generation needs Stable Diffusion v1.4 (sd-v1-4.ckpt or a diffusers folder): SD_PATH=/path/to/sd-v1-4.ckpt make demo"
  echo "(with CONTROLNET=runs/p3/controlnet from  python p3_controlnet/train.py --sd /path/to/sd-v1-4.ckpt --out runs/p3;"
  echo " without one the demo trains a short ControlNet first)"
  exit 0
fi

if [ ! -f "$CONTROLNET/config.json" ]; then
  train="${P3_DEMO_TRAIN:-auto}"
  if [ "$train" = auto ]; then
    train=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
  fi
  if [ "$train" != 1 ]; then
    echo "(P3 generation skipped: no trained ControlNet at $CONTROLNET and no GPU to train a demo one;"
    echo " pass CONTROLNET=..., or P3_DEMO_TRAIN=1 to train one on this CPU anyway, which takes hours)"
    step p3_generate --skip "no trained ControlNet at $CONTROLNET and no GPU to train a demo one"
    exit 0
  fi
  steps="${P3_DEMO_STEPS:-500}"
  echo "no trained ControlNet at $CONTROLNET: training a demo one for $steps steps on $OUT/p3_fill50k"
  step p3_train -- "$PY" p3_controlnet/train.py --sd "$SD_PATH" --data "$OUT/p3_fill50k" --out "$OUT/p3_run" --size "$SIZE" \
    --max-steps "$steps" --sample-every "$steps" --val-count 4 --seed 0 --quiet
  CONTROLNET="$OUT/p3_run/controlnet"
fi

T="$OUT/p3_fill50k/testing"
step p3_generate -- bash hw2_3.sh "$T/prompt.json" "$T/source" "$OUT/p3" "$SD_PATH" "$CONTROLNET" --size "$SIZE"
step p3_score -- "$PY" scripts/evaluate_controlnet.py --pred "$OUT/p3" --gt "$T/target" --prompts "$T/prompt.json" \
  ${CLIP_WEIGHTS:+--clip-weights "$CLIP_WEIGHTS"} ${FID_WEIGHTS:+--fid-weights "$FID_WEIGHTS"} --json "$OUT/p3_scores.json"
step p3_two_circles -- "$PY" p3_controlnet/report.py --sd "$SD_PATH" --controlnet "$CONTROLNET" --size "$SIZE" --out "$OUT/p3_figs/two_circles.png"
echo "P3 outputs: $OUT/p3/ (one PNG per test line), scores in $OUT/p3_scores.json, figure $OUT/p3_figs/two_circles.png"
echo "(ControlNet used: $CONTROLNET)"
