#!/usr/bin/env bash
# Course entry point, textual inversion: bash hw2_ti.sh INPUT_JSON OUT_DIR SD_CKPT [EMBEDDINGS_DIR] [infer_ti.py flags]
# Writes OUT_DIR/<concept>/<prompt index>/source<concept>_prompt<prompt index>_<k>.png, 25 images per prompt
# of INPUT_JSON, with Stable Diffusion v1.4 from SD_CKPT (sd-v1-4.ckpt, a .safetensors or a diffusers folder)
# and the tokens learned by p5_personalization/train_ti.py, read from EMBEDDINGS_DIR (its --out folder;
# default checkpoints/textual_inversion). Extra flags go to p5_personalization/infer_ti.py (see its --help).
set -euo pipefail
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then  # asked for, not taken for an argument
  echo "usage: bash hw2_ti.sh INPUT_JSON OUT_DIR SD_CKPT [EMBEDDINGS_DIR] [infer_ti.py flags]"
  exit 0
fi
if [ $# -lt 3 ]; then
  echo "usage: bash hw2_ti.sh INPUT_JSON OUT_DIR SD_CKPT [EMBEDDINGS_DIR] [infer_ti.py flags]" >&2
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
source "$HERE/scripts/python_env.sh"
JSON="$1"; OUT="$2"; SD="$3"; shift 3
EMB="$HERE/checkpoints/textual_inversion"
# a first extra argument without a leading dash is EMBEDDINGS_DIR (as hw2_3.sh takes CONTROLNET): -h is a flag
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then EMB="$1"; shift; fi
exec "$PY" "$HERE/p5_personalization/infer_ti.py" --json "$JSON" --out "$OUT" --sd "$SD" --embeddings "$EMB" "$@"
