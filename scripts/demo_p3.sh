#!/usr/bin/env bash
# `make demo`, problem 3: ControlNet on Stable Diffusion v1.4 (Fill50k).
# Always: generates a small Fill50k-style set with p3_controlnet/make_fill50k.py (demo_out/p3_fill50k/).
# With SD_PATH=/path/to/sd-v1-4.ckpt (or a diffusers SD v1.x folder) and a trained ControlNet
# (CONTROLNET=..., default checkpoints/controlnet): runs hw2_3.sh on the generated test split, scores the
# output with scripts/evaluate_controlnet.py, and draws the two-circle report figure.
# Without them it says what is missing and exits 0. Nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/find_python.sh)"
OUT="${OUT:-demo_out}"
SD_PATH="${SD_PATH:-}"
CONTROLNET="${CONTROLNET:-checkpoints/controlnet}"

echo "== P3: ControlNet on Stable Diffusion v1.4 (Fill50k) =="
"$PY" p3_controlnet/make_fill50k.py --out "$OUT/p3_fill50k" --n 200 --n-test 20 --size 512 --seed 0
echo "Fill50k-style data: $OUT/p3_fill50k/{training,testing}/{source/,target/,prompt.json}"

missing=""
[ -n "$SD_PATH" ] || missing="SD_PATH is not set"
[ -z "$SD_PATH" ] || [ -e "$SD_PATH" ] || missing="SD_PATH=$SD_PATH does not exist"
[ -n "$missing" ] || [ -f "$CONTROLNET/config.json" ] || missing="no trained ControlNet at $CONTROLNET"
if [ -n "$missing" ]; then
  echo "(P3 generation skipped: $missing)"
  echo "P3 generation needs Stable Diffusion v1.4 (sd-v1-4.ckpt or a diffusers folder) and a ControlNet trained with"
  echo "  python p3_controlnet/train.py --sd /path/to/sd-v1-4.ckpt --data hw2_data/fill50k --out runs/p3"
  echo "then: SD_PATH=/path/to/sd-v1-4.ckpt CONTROLNET=runs/p3/controlnet make demo"
  exit 0
fi

T="$OUT/p3_fill50k/testing"
time bash hw2_3.sh "$T/prompt.json" "$T/source" "$OUT/p3" "$SD_PATH" "$CONTROLNET"
"$PY" scripts/evaluate_controlnet.py --pred "$OUT/p3" --gt "$T/target" --prompts "$T/prompt.json" \
  ${CLIP_WEIGHTS:+--clip-weights "$CLIP_WEIGHTS"} ${FID_WEIGHTS:+--fid-weights "$FID_WEIGHTS"} --json "$OUT/p3_scores.json"
"$PY" p3_controlnet/report.py --sd "$SD_PATH" --controlnet "$CONTROLNET" --out "$OUT/p3_figs/two_circles.png"
echo "P3 outputs: $OUT/p3/ (one PNG per test line), scores in $OUT/p3_scores.json, figure $OUT/p3_figs/two_circles.png"
