#!/usr/bin/env bash
# Course entry point, problem 1: bash hw2_1.sh OUT_DIR
# Writes OUT_DIR/mnistm/{d}_{i:03d}.png and OUT_DIR/svhn/{d}_{i:03d}.png, 50 per digit, with the shipped
# checkpoint and a fixed seed. Extra flags go to p1_ddpm/infer.py (see its --help).
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash hw2_1.sh OUT_DIR [infer.py flags]" >&2
  exit 2
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/scripts/python_env.sh"
OUT="$1"; shift
exec "$PY" "$HERE/p1_ddpm/infer.py" --layout 2024 --out "$OUT" "$@"
