#!/usr/bin/env bash
# DLCV HW2 2025 hand-in, problem 1: bash hw2_1.sh OUT_DIR [infer.py flags]
# Writes OUT_DIR/mnistm/{d}_{i:03d}.png for the even digits and OUT_DIR/svhn/{d}_{i:03d}.png
# for the odd ones, 50 per digit, 28x28 RGB, with the shipped checkpoint
# (checkpoints/p1_ddpm.safetensors) and a fixed seed. Extra flags go to p1_ddpm/infer.py (see its --help).
# The course passes no flags. Runs from any working directory; to hand in, copy this year's three
# scripts (handin/2025/hw2_{1,2,3}.sh) to the repository's top.
set -euo pipefail
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then  # asked for, not taken for OUT_DIR
  echo "usage: bash hw2_1.sh OUT_DIR [infer.py flags]"
  exit 0
fi
if [ $# -lt 1 ]; then
  echo "usage: bash hw2_1.sh OUT_DIR [infer.py flags]" >&2
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
    echo "hw2_1.sh: scripts/python_env.sh not found above $HERE; run this script inside the repository" >&2
    exit 2
  fi
  ROOT="$(dirname "$ROOT")"
done
source "$ROOT/scripts/python_env.sh"
OUT="$1"; shift
exec "$PY" "$ROOT/p1_ddpm/infer.py" --year 2025 --out "$OUT" "$@"
