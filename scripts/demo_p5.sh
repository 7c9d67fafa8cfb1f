#!/usr/bin/env bash
# `make demo`, problem 5: CLIP zero-shot and textual inversion (single and multi-concept) on the shared
# DreamBooth dog and cat photos (../shared/data/dreambooth/{dog,cat}). Each part runs when you give what it needs:
#   SD_PATH=/path/to/sd-v1-4.ckpt (or a diffusers folder)   textual inversion: train <new1> (dog) and <new2> (cat),
#                                    once independently and once jointly with shared cross-attention K/V
#                                    (--method joint-kv), then 25 images per prompt of p5_personalization/demo_input.json
#   CLIP_WEIGHTS=/path/to/ViT-B-32.pt  (+ CLIP_MODEL, default ViT-B-32)   score those images with scripts/evaluate_ti.py
#   CLIP_DATA=/path/to/hw2_data/clip_zeroshot (val/ and id2label.json) with CLIP_WEIGHTS   zero-shot classification
# Optional: TI_STEPS (default 500; the course-quality recipe is ~3000), TI_IMAGES (images per prompt, default 25),
# TI_RESOLUTION (training and generation image side, default 512).
# Without them it says what is missing and exits 0. Outputs go to $OUT (default demo_out)/p5_*.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh
OUT="${OUT:-demo_out}"
SD_PATH="${SD_PATH:-}"
CLIP_WEIGHTS="${CLIP_WEIGHTS:-}"
CLIP_MODEL="${CLIP_MODEL:-ViT-B-32}"
CLIP_DATA="${CLIP_DATA:-}"
TI_STEPS="${TI_STEPS:-500}"
TI_IMAGES="${TI_IMAGES:-25}"
TI_RESOLUTION="${TI_RESOLUTION:-512}"
PHOTOS=../shared/data/dreambooth
step() { "$PY" scripts/demo_step.py "$OUT" "$@"; }

echo "== P5: CLIP zero-shot classification =="
if [ -n "$CLIP_WEIGHTS" ] && [ -n "$CLIP_DATA" ]; then
  step p5_zeroshot -- "$PY" p5_personalization/clip_zeroshot.py --data "$CLIP_DATA/val" --labels "$CLIP_DATA/id2label.json" \
    --model "$CLIP_MODEL" --weights "$CLIP_WEIGHTS" --out "$OUT/p5_zeroshot"
else
  echo "(skipped: needs CLIP_WEIGHTS=/path/to/ViT-B-32.pt and CLIP_DATA=/path/to/hw2_data/clip_zeroshot"
  echo " holding val/<classid>_<n>.png and id2label.json; nothing is downloaded)"
  step p5_zeroshot --skip "needs CLIP_WEIGHTS and CLIP_DATA"
fi

echo
echo "== P5: textual inversion on SD v1.4 (dog <new1>, cat <new2>, both in one prompt) =="
if [ -z "$SD_PATH" ]; then
  echo "(skipped: needs SD_PATH=/path/to/sd-v1-4.ckpt or a diffusers folder, e.g. SD_PATH=... make demo;"
  echo " it then trains on $PHOTOS/{dog,cat}; a GPU is strongly advised: on a CPU one step takes seconds to minutes)"
  step p5_textual_inversion --skip "SD_PATH is not set"
  exit 0
fi
if [ ! -d "$PHOTOS/dog" ] || [ ! -d "$PHOTOS/cat" ]; then
  echo "(skipped: the DreamBooth photos are not at $PHOTOS/{dog,cat})"
  step p5_textual_inversion --skip "the DreamBooth photos are not at $PHOTOS/{dog,cat}"
  exit 0
fi
COMMON=(--sd "$SD_PATH" --steps "$TI_STEPS" --resolution "$TI_RESOLUTION" --quiet)
step p5_train_dog -- "$PY" p5_personalization/train_ti.py "${COMMON[@]}" --images "$PHOTOS/dog" --token "<new1>" --init-word dog \
  --out "$OUT/p5_emb_ti"
step p5_train_cat -- "$PY" p5_personalization/train_ti.py "${COMMON[@]}" --images "$PHOTOS/cat" --token "<new2>" --init-word cat \
  --out "$OUT/p5_emb_ti"
step p5_train_joint -- "$PY" p5_personalization/train_ti.py "${COMMON[@]}" --method joint-kv \
  --images "$PHOTOS/dog" --token "<new1>" --init-word dog --images "$PHOTOS/cat" --token "<new2>" --init-word cat \
  --out "$OUT/p5_emb_joint"
for method in ti joint; do
  step "p5_generate_$method" -- bash hw2_ti.sh p5_personalization/demo_input.json "$OUT/p5_gen_$method" "$SD_PATH" "$OUT/p5_emb_$method" \
    --images-per-prompt "$TI_IMAGES" --resolution "$TI_RESOLUTION" --quiet
done
if [ -n "$CLIP_WEIGHTS" ]; then
  for method in ti joint; do
    echo "-- CLIP scores, embeddings learned with method: $method --"
    step "p5_score_$method" -- "$PY" scripts/evaluate_ti.py --json p5_personalization/demo_input.json --input-dir "$PHOTOS" \
      --output-dir "$OUT/p5_gen_$method" --clip-weights "$CLIP_WEIGHTS" --clip-model "$CLIP_MODEL" \
      --report "$OUT/p5_scores_$method.json"
  done
else
  echo "(CLIP scoring skipped: pass CLIP_WEIGHTS=/path/to/ViT-B-32.pt to score the images)"
  step p5_score --skip "needs CLIP_WEIGHTS to score the generated images"
fi
echo "P5 outputs: embeddings in $OUT/p5_emb_{ti,joint}/, images in $OUT/p5_gen_{ti,joint}/<entry>/<prompt>/,"
echo "entry 2 of p5_personalization/demo_input.json puts both concepts in one prompt"
