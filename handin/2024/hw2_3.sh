#!/usr/bin/env bash
# DLCV HW2 2024 hand-in, problem 3: bash hw2_3.sh INPUT_JSON OUT_DIR SD_CKPT [EMBEDDINGS_DIR] [infer_ti.py flags]
# Textual inversion: writes OUT_DIR/<concept>/<prompt index>/source<concept>_prompt<prompt index>_<k>.png,
# 25 images per prompt of INPUT_JSON, with Stable Diffusion v1.4 from SD_CKPT (sd-v1-4.ckpt, a .safetensors
# or a diffusers folder) and the tokens learned by p5_personalization/train_ti.py, read from EMBEDDINGS_DIR
# (default checkpoints/textual_inversion). Extra flags go to p5_personalization/infer_ti.py.
# Runs hw2_ti.sh, the same command under its own name (it must be at the repository's top, where it ships).
# The course passes no flags. Runs from any working directory; to hand in, copy this year's three
# scripts (handin/2024/hw2_{1,2,3}.sh) to the repository's top.
set -euo pipefail
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then  # asked for, not taken for an argument
  echo "usage: bash hw2_3.sh INPUT_JSON OUT_DIR SD_CKPT [EMBEDDINGS_DIR] [infer_ti.py flags]"
  exit 0
fi
if [ $# -lt 3 ]; then
  echo "usage: bash hw2_3.sh INPUT_JSON OUT_DIR SD_CKPT [EMBEDDINGS_DIR] [infer_ti.py flags]" >&2
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
    echo "hw2_3.sh: scripts/python_env.sh not found above $HERE; run this script inside the repository" >&2
    exit 2
  fi
  ROOT="$(dirname "$ROOT")"
done
# the named entry point at the repository's top does the rest (its arguments are this year's)
exec bash "$ROOT/hw2_ti.sh" "$@"
