#!/usr/bin/env bash
# Course entry point, problem 4 (DANN): bash hw2_dann.sh IMAGE_DIR OUT_CSV [--target usps|svhn]
# Predicts the digit of every image in IMAGE_DIR and writes OUT_CSV (`image_name,label`, header first)
# with the shipped checkpoint for the target domain, which is read from IMAGE_DIR's path (it contains
# usps or svhn) unless --target says. Extra flags go to p4_dann/infer.py (see its --help).
set -euo pipefail
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then  # asked for, not taken for an argument
  echo "usage: bash hw2_dann.sh IMAGE_DIR OUT_CSV [--target usps|svhn] [infer.py flags]"
  exit 0
fi
if [ $# -lt 2 ]; then
  echo "usage: bash hw2_dann.sh IMAGE_DIR OUT_CSV [--target usps|svhn] [infer.py flags]" >&2
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
exec "$PY" "$HERE/p4_dann/infer.py" "$@"
