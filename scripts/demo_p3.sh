#!/usr/bin/env bash
# `make demo`, problem 3: ControlNet on Fill50k.
# Default (no SD_PATH): the mini Stable Diffusion this repository trained (checkpoints/mini_sd, issue 16) with
# its ControlNet (checkpoints/mini_controlnet): generates a course-style testing folder (512-px sources, the
# mini SD's prompt language: make_fill50k.py --preset mini), runs hw2_3.sh on it at the model's native 64 px,
# scores the output with the offline Fill50k judge (mask IoU against the control, colours) and draws the
# two-circle report figure. A working default and proof that the trainer learns, not SD v1.4 quality.
# With SD_PATH=/path/to/sd-v1-4.ckpt (or a diffusers SD v1.x folder): generates a Fill50k set
# (demo_out/p3_fill50k/), uses the ControlNet at CONTROLNET (default checkpoints/controlnet); when there is
# none, trains a short demo one on the generated set first (P3_DEMO_STEPS steps, default 500: a few minutes
# on one GPU; on a CPU only with P3_DEMO_TRAIN=1, as it takes hours there). Then the same generate, score and
# figure steps. What is missing is said and the script exits 0. Nothing is downloaded.
# P3_DEMO_SIZE (default 512) is the resolution of the generated set and of the SD v1.4 demo training.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh
OUT="${OUT:-demo_out}"
SD_PATH="${SD_PATH:-}"
SIZE="${P3_DEMO_SIZE:-512}"
step() { "$PY" scripts/demo_step.py "$OUT" "$@"; }

if [ -z "$SD_PATH" ]; then
  echo "== P3: ControlNet on the mini Stable Diffusion (Fill50k-style, 64 px; SD_PATH=... for SD v1.4) =="
  SD_PATH=checkpoints/mini_sd
  CONTROLNET="${CONTROLNET:-checkpoints/mini_controlnet}"
  step p3_data -- "$PY" p3_controlnet/make_fill50k.py --preset mini --out "$OUT/p3_fill50k" --n 1 --n-test 40 \
    --size "$SIZE" --seed 0
  missing=""
  [ -f "$SD_PATH/model_index.json" ] || missing="no mini SD at $SD_PATH"
  [ -n "$missing" ] || [ -f "$CONTROLNET/config.json" ] || missing="no ControlNet at $CONTROLNET"
  if [ -n "$missing" ]; then
    echo "(P3 generation skipped: $missing)"
    step p3_generate --skip "$missing"
    exit 0
  fi
  T="$OUT/p3_fill50k/testing"
  step p3_generate -- bash hw2_3.sh "$T/prompt.json" "$T/source" "$OUT/p3" "$SD_PATH" "$CONTROLNET"
  step p3_score -- "$PY" scripts/evaluate_controlnet.py --pred "$OUT/p3" --prompts "$T/prompt.json" --source "$T/source" \
    --json "$OUT/p3_scores.json"
  step p3_two_circles -- "$PY" p3_controlnet/report.py --sd "$SD_PATH" --controlnet "$CONTROLNET" \
    --out "$OUT/p3_figs/two_circles.png"
  echo "P3 outputs: $OUT/p3/ (one PNG per test line), scores in $OUT/p3_scores.json, figure $OUT/p3_figs/two_circles.png"
  echo "(mini SD $SD_PATH, ControlNet $CONTROLNET)"
  exit 0
fi

CONTROLNET="${CONTROLNET:-checkpoints/controlnet}"
echo "== P3: ControlNet on Stable Diffusion v1.4 (Fill50k) =="
step p3_data -- "$PY" p3_controlnet/make_fill50k.py --out "$OUT/p3_fill50k" --n 200 --n-test 20 --size "$SIZE" --seed 0
echo "Fill50k-style data: $OUT/p3_fill50k/{training,testing}/{source/,target/,prompt.json}"

if [ ! -e "$SD_PATH" ]; then
  echo "(P3 generation skipped: SD_PATH=$SD_PATH does not exist)"
  step p3_generate --skip "SD_PATH=$SD_PATH does not exist"
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
step p3_score -- "$PY" scripts/evaluate_controlnet.py --pred "$OUT/p3" --gt "$T/target" --prompts "$T/prompt.json" --source "$T/source" \
  ${CLIP_WEIGHTS:+--clip-weights "$CLIP_WEIGHTS"} ${FID_WEIGHTS:+--fid-weights "$FID_WEIGHTS"} --json "$OUT/p3_scores.json"
step p3_two_circles -- "$PY" p3_controlnet/report.py --sd "$SD_PATH" --controlnet "$CONTROLNET" --size "$SIZE" --out "$OUT/p3_figs/two_circles.png"
echo "P3 outputs: $OUT/p3/ (one PNG per test line), scores in $OUT/p3_scores.json, figure $OUT/p3_figs/two_circles.png"
echo "(ControlNet used: $CONTROLNET)"
