#!/usr/bin/env bash
# DLCV HW2 2025 hand-in, problem 3: bash hw2_3.sh PROMPT_JSON SOURCE_DIR OUT_DIR SD_CKPT [CONTROLNET] [infer.py flags]
# ControlNet: writes OUT_DIR/<target> for every line {"source", "target", "prompt"} of PROMPT_JSON, from
# the control image SOURCE_DIR/<source>, with Stable Diffusion v1.4 (SD_CKPT: sd-v1-4.ckpt or a diffusers
# folder) and a trained ControlNet (CONTROLNET: the folder p3_controlnet/train.py writes; default
# checkpoints/controlnet). DDIM 50 steps, eta 0, guidance 7.5, seed 42 + line index. Extra flags go to
# p3_controlnet/infer.py (see its --help).
# The course passes no flags. Runs from any working directory; to hand in, copy this year's three
# scripts (handin/2025/hw2_{1,2,3}.sh) to the repository's top.
set -euo pipefail
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then  # asked for, not taken for an argument
  echo "usage: bash hw2_3.sh PROMPT_JSON SOURCE_DIR OUT_DIR SD_CKPT [CONTROLNET] [infer.py flags]"
  exit 0
fi
if [ $# -lt 4 ]; then
  echo "usage: bash hw2_3.sh PROMPT_JSON SOURCE_DIR OUT_DIR SD_CKPT [CONTROLNET] [infer.py flags]" >&2
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
source "$ROOT/scripts/python_env.sh"
PROMPTS="$1"; SOURCE="$2"; OUT="$3"; SD="$4"; shift 4
CONTROLNET="$ROOT/checkpoints/controlnet"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then CONTROLNET="$1"; shift; fi
exec "$PY" "$ROOT/p3_controlnet/infer.py" --prompts "$PROMPTS" --source-dir "$SOURCE" --out "$OUT" --sd "$SD" \
  --controlnet "$CONTROLNET" "$@"
