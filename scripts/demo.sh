#!/usr/bin/env bash
# `make demo`: P1 and its i-CLEVR variant and P4 end to end on the shipped checkpoints, then P2, P3 and P5 when
# given their weights, into demo_out/; it ends by writing demo_out/index.html, one page with every figure and
# number (scripts/demo_page.py). Each step runs through scripts/demo_step.py, which records its command and
# time in demo_out/steps/; the scores are JSON files beside the outputs, which the page reads.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh
OUT=demo_out
mkdir -p "$OUT"
rm -rf "$OUT/steps"  # this run's steps only: a problem skipped now is not shown with an earlier run's outputs
step() { "$PY" scripts/demo_step.py "$OUT" "$@"; }

echo "== P1: class-conditional DDPM (MNIST-M + SVHN) =="
# the 2024 hand-in layout: every digit from both data sets, so the evaluation covers all of them
step p1_sample -- bash handin/2024/hw2_1.sh "$OUT/p1"
step p1_figures -- "$PY" p1_ddpm/report.py --out "$OUT/p1_figs"
LENET="${LENET:-}"
if [ -z "$LENET" ] && [ -f ../shared/data/dlcv/Classifier.pth ]; then LENET=../shared/data/dlcv/Classifier.pth; fi
if [ -n "$LENET" ]; then
  step p1_score -- "$PY" scripts/evaluate_digits.py --folder "$OUT/p1" --checkpoint "$LENET" --json "$OUT/p1_accuracy.json"
else
  echo "(the course grader Classifier.pth was not found: MNIST-M is scored by this project's MNIST-M classifier;"
  echo " pass LENET=/path/to/Classifier.pth for the course's number)"
  step p1_score -- "$PY" scripts/evaluate_digits.py --folder "$OUT/p1" --json "$OUT/p1_accuracy.json"
fi
echo "P1 outputs: $OUT/p1/{mnistm,svhn}/ (500 PNGs each), figures in $OUT/p1_figs/, scores in $OUT/p1_accuracy.json"

for part in iclevr p2 p3 p4 p5; do
  echo
  OUT="$OUT" bash "scripts/demo_$part.sh"
done

echo
"$PY" scripts/demo_page.py "$OUT"
