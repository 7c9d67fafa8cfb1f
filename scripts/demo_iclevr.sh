#!/usr/bin/env bash
# `make demo`, i-CLEVR (the lab variant of P1): sample the lab's label lists with the shipped checkpoint,
# draw the denoising process, and score the samples with the project's own judge. Needs no data.
# Writes demo_out/iclevr/{test,new_test}/*.png, {test,new_test}_grid.png and denoise.png.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh
OUT="${OUT:-demo_out}/iclevr"

echo "== i-CLEVR: multi-label conditional DDPM (rendered-data checkpoint) =="
time "$PY" p1_ddpm/infer.py --task iclevr --out "$OUT" --labels assets/iclevr/test.json assets/iclevr/new_test.json \
  --denoise "red sphere,cyan cylinder,cyan cube" --quiet
for name in test new_test; do
  "$PY" scripts/evaluate_iclevr.py --images "$OUT/$name" --labels "assets/iclevr/$name.json" --judge own | tail -n 1 \
    | sed "s/^/$name.json, own judge: /"
done
echo "(the lab's evaluator: scripts/evaluate_iclevr.py --images $OUT/test --labels assets/iclevr/test.json --checkpoint checkpoint.pth)"
