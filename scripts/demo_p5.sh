#!/usr/bin/env bash
# `make demo`, problem 5: CLIP zero-shot and textual inversion (single and multi-concept).
# Default (no SD_PATH): textual inversion on the mini SD (checkpoints/mini_sd) with its shipped embeddings
# (checkpoints/mini_ti, learned from assets/mini_ti): generates MINI_TI_IMAGES (default 8) images per prompt of
# assets/mini_ti/input.json, and of the same prompts with the init words, judges both offline
# (evaluate_ti.py --judge fill50k) and draws the prompts' figure (p5_personalization/report.py).
# On SD v1.4, the shared DreamBooth dog and cat photos (../shared/data/dreambooth/{dog,cat}); each part runs
# when you give what it needs:
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
    --clip-arch "$CLIP_MODEL" --clip-weights "$CLIP_WEIGHTS" --out "$OUT/p5_zeroshot"
else
  echo "(skipped: needs CLIP_WEIGHTS=/path/to/ViT-B-32.pt and CLIP_DATA=/path/to/hw2_data/clip_zeroshot"
  echo " holding val/<classid>_<n>.png and id2label.json; nothing is downloaded)"
  step p5_zeroshot --skip "needs CLIP_WEIGHTS and CLIP_DATA"
fi

echo
if [ -z "$SD_PATH" ]; then
  echo "== P5: textual inversion on the mini SD (<new1> chartreuse circles, <new2> striped circles; SD_PATH=... for SD v1.4) =="
  MINI_SD=checkpoints/mini_sd
  MINI_TI="${MINI_TI:-checkpoints/mini_ti}"
  DATA=assets/mini_ti
  if [ ! -f "$MINI_SD/model_index.json" ] || [ ! -f "$MINI_TI/new1.safetensors" ]; then
    echo "(skipped: no mini SD at $MINI_SD or no embeddings in $MINI_TI)"
    step p5_textual_inversion --skip "no mini SD at $MINI_SD or no embeddings in $MINI_TI"
    exit 0
  fi
  JUDGE=(--judge fill50k --alias "<new1>=chartreuse" --style-token "<new2>=stripes")
  N="${MINI_TI_IMAGES:-8}"  # images per prompt: enough for the judge's shares, quick on a CPU
  step p5_generate_ti -- bash hw2_ti.sh "$DATA/input.json" "$OUT/p5_gen_ti" "$MINI_SD" "$MINI_TI" \
    --images-per-prompt "$N" --quiet
  step p5_generate_init_word -- bash hw2_ti.sh "$DATA/input_init_word.json" "$OUT/p5_gen_init_word" "$MINI_SD" "$MINI_TI" \
    --images-per-prompt "$N" --quiet
  step p5_score_ti -- "$PY" scripts/evaluate_ti.py --json "$DATA/input.json" --output-dir "$OUT/p5_gen_ti" "${JUDGE[@]}" \
    --report "$OUT/p5_scores_ti.json"
  step p5_score_init_word -- "$PY" scripts/evaluate_ti.py --json "$DATA/input_init_word.json" \
    --output-dir "$OUT/p5_gen_init_word" "${JUDGE[@]}" --expect-concept "<new1>=green" --expect-concept "<new2>=white" \
    --report "$OUT/p5_scores_init_word.json"
  step p5_figure -- "$PY" p5_personalization/report.py --json "$DATA/input.json" --output-dir "$OUT/p5_gen_ti" \
    --output-dir "$OUT/p5_gen_init_word" --label token --label "init word" --out "$OUT/p5_figs/ti_prompts.png"
  echo "P5 outputs: images in $OUT/p5_gen_{ti,init_word}/<entry>/<prompt>/, judge scores in $OUT/p5_scores_{ti,init_word}.json,"
  echo "figure $OUT/p5_figs/ti_prompts.png (each prompt with the learned tokens, then with their init words)"
  exit 0
fi
echo "== P5: textual inversion on SD v1.4 (dog <new1>, cat <new2>, both in one prompt) =="
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
      --output-dir "$OUT/p5_gen_$method" --clip-weights "$CLIP_WEIGHTS" --clip-arch "$CLIP_MODEL" \
      --report "$OUT/p5_scores_$method.json"
  done
else
  echo "(CLIP scoring skipped: pass CLIP_WEIGHTS=/path/to/ViT-B-32.pt to score the images)"
  step p5_score --skip "needs CLIP_WEIGHTS to score the generated images"
fi
echo "P5 outputs: embeddings in $OUT/p5_emb_{ti,joint}/, images in $OUT/p5_gen_{ti,joint}/<entry>/<prompt>/,"
echo "entry 2 of p5_personalization/demo_input.json puts both concepts in one prompt"
