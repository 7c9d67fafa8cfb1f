#!/usr/bin/env bash
# `make demo`, problem 4: DANN inference with the shipped checkpoints (checkpoints/p4_dann_{usps,svhn}.safetensors).
# On real test digits written from ../shared/data/digits when it is there (the first 500 USPS test images and
# SVHN images 900-1082), else on the ten USPS and five SVHN samples in assets/p4/. Then prints the
# accuracy table of BENCHMARKS.md (or p4_report/p4_table.md) when present.
# Writes demo_out/p4/{usps,svhn}_pred.csv (image_name,label) and their accuracy, demo_out/p4/{usps,svhn}_accuracy.json.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh
OUT="${OUT:-demo_out}"
SHARED="${SHARED:-../shared/data/digits}"
step() { "$PY" scripts/demo_step.py "$OUT" "$@"; }

echo "== P4: DANN (MNIST-M -> USPS, MNIST-M -> SVHN) with the shipped checkpoints =="
mkdir -p "$OUT/p4"
if [ -f "$SHARED/usps.npz" ] && [ -f "$SHARED/svhn_partial.npz" ]; then
  SAMPLES="$OUT/p4_samples"
  "$PY" - "$SHARED" "$SAMPLES" <<'PYEOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
sys.path.insert(0, ".")
from scripts.prepare_digits import SVHN_TRAIN_COUNT, to_rgb28
shared, out = Path(sys.argv[1]), Path(sys.argv[2])
for name, file in (("usps", "usps.npz"), ("svhn", "svhn_partial.npz")):
    with np.load(shared / file) as z:
        x, y = (z["x_test"][:500], z["y_test"][:500]) if name == "usps" else \
            (z["x_train"][SVHN_TRAIN_COUNT:], z["y_train"][SVHN_TRAIN_COUNT:])
    first = 0 if name == "usps" else SVHN_TRAIN_COUNT
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["image_name,label"]
    for i, (img, label) in enumerate(zip(x, y)):
        fname = f"test_{first + i:05d}.png"
        Image.fromarray(to_rgb28(img)).save(folder / fname)
        lines.append(f"{fname},{int(label)}")
    (out / f"{name}_labels.csv").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(x)} {name} test images to {folder}")
PYEOF
else
  SAMPLES=assets/p4
  echo "($SHARED not found: using the samples in assets/p4/)"
fi
for t in usps svhn; do
  step "p4_$t" -- bash hw2_dann.sh "$SAMPLES/$t" "$OUT/p4/${t}_pred.csv"
  step "p4_score_$t" -- "$PY" scripts/evaluate_labels.py --pred "$OUT/p4/${t}_pred.csv" \
    --labels "$SAMPLES/${t}_labels.csv" --json "$OUT/p4/${t}_accuracy.json"
done
head -4 "$OUT/p4/usps_pred.csv"

if grep -q "<!-- bench_p4 start -->" BENCHMARKS.md 2>/dev/null; then
  echo; echo "Accuracy table (BENCHMARKS.md, target test splits):"
  sed -n '/<!-- bench_p4 start -->/,/<!-- bench_p4 end -->/p' BENCHMARKS.md | grep '^|' | head -6
elif [ -f p4_report/p4_table.md ]; then
  echo; cat p4_report/p4_table.md
else
  echo "(no P4 table yet: python p4_dann/report.py --data hw2_data/digits writes p4_report/p4_table.md)"
fi
echo "P4 outputs: $OUT/p4/{usps,svhn}_pred.csv, accuracy in $OUT/p4/{usps,svhn}_accuracy.json"
