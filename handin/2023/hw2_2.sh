#!/usr/bin/env bash
# DLCV HW2 2023 hand-in, problem 2: bash hw2_2.sh NOISE_DIR OUT_DIR UNET_PT [infer.py flags]
# Writes OUT_DIR/NAME.png for every NOISE_DIR/NAME.pt (00.pt -> 00.png): DDIM, 50 steps, eta 0, with the
# course's pretrained face UNet (UNET_PT), each image min-max normalised on its own. Extra flags go to
# p2_ddim/infer.py (see its --help). Runs on CPU too, slowly, with a progress bar.
# The course passes no flags. Runs from any working directory; to hand in, copy this year's three
# scripts (handin/2023/hw2_{1,2,3}.sh) to the repository's top.
set -euo pipefail
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then  # asked for, not taken for an argument
  echo "usage: bash hw2_2.sh NOISE_DIR OUT_DIR UNET_PT [infer.py flags]"
  exit 0
fi
if [ $# -lt 3 ]; then
  echo "usage: bash hw2_2.sh NOISE_DIR OUT_DIR UNET_PT [infer.py flags]" >&2
  exit 2
fi
# The script's own folder, also when it is run through a symlink (`ln -s REPO/hw2_N.sh .`), where the
# link's folder holds no repository: readlink -f, or (a readlink without -f) the links followed one by one.
SELF="$(readlink -f "${BASH_SOURCE[0]}" 2>/dev/null)" || {
  SELF="${BASH_SOURCE[0]}"
  while [ -L "$SELF" ]; do
    LINK="$(readlink "$SELF")"
    case "$LINK" in /*) SELF="$LINK" ;; *) SELF="$(dirname "$SELF")/$LINK" ;; esac
  done
}
HERE="$(cd "$(dirname "$SELF")" && pwd)"
# The repository root: the first folder upwards that holds scripts/python_env.sh (this one when the script
# sits at the top, as handed in; two levels up in handin/<year>/).
ROOT="$HERE"
while [ ! -f "$ROOT/scripts/python_env.sh" ]; do
  if [ "$ROOT" = / ]; then
    echo "hw2_2.sh: scripts/python_env.sh not found above $HERE; run this script inside the repository" >&2
    exit 2
  fi
  ROOT="$(dirname "$ROOT")"
done
source "$ROOT/scripts/python_env.sh"
NOISE="$1"; OUT="$2"; UNET="$3"; shift 3
exec "$PY" "$ROOT/p2_ddim/infer.py" --noise-dir "$NOISE" --out "$OUT" --unet "$UNET" "$@"
