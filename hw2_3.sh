#!/usr/bin/env bash
# Course entry point, problem 3: bash hw2_3.sh PROMPT_JSON SOURCE_DIR OUT_DIR SD_CKPT [CONTROLNET] [infer.py flags]
# Writes OUT_DIR/<target> for every line {"source", "target", "prompt"} of PROMPT_JSON, from the control image
# SOURCE_DIR/<source>, with Stable Diffusion v1.4 (SD_CKPT: sd-v1-4.ckpt or a diffusers folder) and a trained
# ControlNet (CONTROLNET: the folder p3_controlnet/train.py writes; default checkpoints/controlnet).
# DDIM 50 steps, eta 0, guidance 7.5, seed 42 + line index. Extra flags go to p3_controlnet/infer.py.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: bash hw2_3.sh PROMPT_JSON SOURCE_DIR OUT_DIR SD_CKPT [CONTROLNET] [infer.py flags]" >&2
  exit 2
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/scripts/python_env.sh"
PROMPTS="$1"; SOURCE="$2"; OUT="$3"; SD="$4"; shift 4
CONTROLNET="$HERE/checkpoints/controlnet"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then CONTROLNET="$1"; shift; fi
exec "$PY" "$HERE/p3_controlnet/infer.py" --prompts "$PROMPTS" --source-dir "$SOURCE" --out "$OUT" --sd "$SD" \
  --controlnet "$CONTROLNET" "$@"
