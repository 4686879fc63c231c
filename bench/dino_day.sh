#!/usr/bin/env bash
# README's "A DINO user's day", scaled down to the embedded data so that it
# runs in about a minute: every command of the sequence with the same flags
# (DINO's names where they exist), the nano ViT instead of ViT-S/16.
# OUT=runs/dino-day (removed first), SERE=target/release/sere (SKIP_BUILD=1
# to use it as it is).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/dino-day}"
SERE="${SERE:-target/release/sere}"
if [ -z "${SKIP_BUILD:-}" ]; then
    cargo build --release --locked -p sere-host --bin sere
fi
rm -rf "$OUT"
mkdir -p "$OUT"
DATA="synthetic:size=32,train=512,test=256"
train() {
    "$SERE" train --arch nano --patch 4 --img 32 --local-img 16 --local_crops_number 2 \
        --batch_size_per_gpu 16 --epochs 2 --data_path "$DATA" --output_dir "$OUT/run" \
        --saveckp_freq 1 --eval-every 32 --set eval_train_images=256 --set eval_test_images=128 \
        --no-eval "$@"
}
set -x
train --steps 40                 # "interrupted" after 40 of the 64 steps
train                            # the same command: continues from step 40
train                            # finished: says so, exits 0
"$SERE" plot "$OUT/run" --out "$OUT/curves.png"
"$SERE" eval knn --checkpoint "$OUT/run" --k 10 20 100 200 --dump-features "$OUT/feats.safetensors"
"$SERE" eval knn --load-features "$OUT/feats.safetensors" --k 20 --temperature 0.04
"$SERE" eval linear --checkpoint "$OUT/run" --optimizer sgd --augment --epochs 2 --lr 0.5 \
    --last-blocks 4 --avgpool --crop-pct 0.875 --save-probe "$OUT/probe.safetensors"
"$SERE" eval linear --checkpoint "$OUT/run" --last-blocks 4 --avgpool --crop-pct 0.875 \
    --load-probe "$OUT/probe.safetensors"
"$SERE" visualize --checkpoint "$OUT/run" --data "$DATA" --count 1 --image-size 64 \
    --threshold 0.6 --out "$OUT/maps"
"$SERE" export --checkpoint "$OUT/run" --out "$OUT/backbone.safetensors"
"$SERE" train --arch nano --patch 4 --img 32 --local-img 16 --local_crops_number 2 \
    --batch_size_per_gpu 16 --steps 8 --data_path "$DATA" --init-from "$OUT/backbone.safetensors" \
    --output_dir "$OUT/finetune" --no-eval
