#!/usr/bin/env bash
# Course entry point, problem 2: bash hw2_2.sh NOISE_DIR OUT_DIR UNET_PT
# Writes OUT_DIR/NAME.png for every NOISE_DIR/NAME.pt (00.pt -> 00.png): DDIM, 50 steps, eta 0, with the
# course's pretrained UNet, each image min-max normalised on its own. Extra flags go to p2_ddim/infer.py
# (see its --help). Runs on CPU too, slowly, with a progress bar.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash hw2_2.sh NOISE_DIR OUT_DIR UNET_PT [infer.py flags]" >&2
  exit 2
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/scripts/python_env.sh"
NOISE="$1"; OUT="$2"; UNET="$3"; shift 3
exec "$PY" "$HERE/p2_ddim/infer.py" --noise-dir "$NOISE" --out "$OUT" --unet "$UNET" "$@"
