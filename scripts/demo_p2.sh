#!/usr/bin/env bash
# `make demo`, problem 2: DDIM with the course's pretrained face UNet, when you point it at the course's
# face folder:   FACE_DIR=/path/to/hw2_data/face make demo     (or: FACE_DIR=... bash scripts/demo_p2.sh)
# It needs FACE_DIR/noise/*.pt, FACE_DIR/GT/*.png and FACE_DIR/UNet.pt; without them it says so and exits 0.
# Writes demo_out/p2/ (one PNG per noise), demo_out/p2_mse.json and demo_out/p2_figs/{eta_grid,slerp,lerp}.png
# (each with its .png.json sidecar), and records its steps in demo_out/steps/ for the page.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh
OUT="${OUT:-demo_out}"
FACE_DIR="${FACE_DIR:-}"
step() { "$PY" scripts/demo_step.py "$OUT" "$@"; }

echo "== P2: DDIM with the course's pretrained face UNet =="
missing=""
if [ -z "$FACE_DIR" ]; then
  missing="FACE_DIR is not set"
else
  [ -d "$FACE_DIR/noise" ] || missing="$missing $FACE_DIR/noise/"
  [ -d "$FACE_DIR/GT" ] || missing="$missing $FACE_DIR/GT/"
  [ -f "$FACE_DIR/UNet.pt" ] || missing="$missing $FACE_DIR/UNet.pt"
  [ -z "$missing" ] || missing="missing:$missing"
fi
if [ -n "$missing" ]; then
  echo "(P2 skipped: $missing)"
  step p2_sample --skip "$missing"
  echo "P2 needs the course's face folder: FACE_DIR=/path/to/hw2_data/face with noise/00.pt..09.pt,"
  echo "GT/00.png..09.png and UNet.pt (the pretrained state dict). Run: FACE_DIR=/path/to/hw2_data/face make demo"
  exit 0
fi

step p2_sample -- bash hw2_2.sh "$FACE_DIR/noise" "$OUT/p2" "$FACE_DIR/UNet.pt"
step p2_score -- "$PY" scripts/evaluate_mse.py --pred "$OUT/p2" --gt "$FACE_DIR/GT" --json "$OUT/p2_mse.json"
step p2_eta_grid -- "$PY" p2_ddim/experiments.py eta-grid --noise-dir "$FACE_DIR/noise" --unet "$FACE_DIR/UNet.pt" \
  --out "$OUT/p2_figs/eta_grid.png" --scale 0.5
for mode in slerp lerp; do
  step "p2_$mode" -- "$PY" p2_ddim/experiments.py interpolate --mode "$mode" --noise-dir "$FACE_DIR/noise" --unet "$FACE_DIR/UNet.pt" \
    --out "$OUT/p2_figs/$mode.png" --scale 0.5
done
echo
echo "P2 outputs: $OUT/p2/ (one PNG per noise), MSE in $OUT/p2_mse.json (pass mark: mean under 20),"
echo "figures in $OUT/p2_figs/ (eta_grid.png, slerp.png, lerp.png)"
