#!/usr/bin/env bash
# Fashion-MNIST ablation (issue 5): random initialisation, DINO only, + spatial
# relation, + channel relation, full SERE, for each seed; same model, same data,
# same number of steps. Trains, then evaluates the final checkpoints with weighted
# 20-NN and a linear probe (`sere eval linear --knn`), and appends one JSON line per evaluation to
# $OUT/results.jsonl. Plot and table: python3 bench/ablation_report.py $OUT.
#
# Environment knobs (all optional):
#   DATA=/usr/share/datasets/fashion-mnist   (Debian package dataset-fashion-mnist)
#   SEEDS="1 2"  STEPS=1200  THREADS=2  OUT=runs/ablation
#   SERE=target/release/sere  (SKIP_BUILD=1 to use it as it is)
#   CONFIGS="dino full spatial channel random"  which runs, in this order
#   PHASE=all | train | eval   train only, evaluate only, or both
#   EVAL_ALL=1  evaluate every checkpoint (default: the final one)
#   FEATURES="cls dino"  frozen features to evaluate: cls = the final CLS token
#       (default); dino = DINO's linear-evaluation features, the CLS tokens of
#       the last 4 blocks and the mean patch token (--last-blocks 4 --avgpool)
#   SERE_EVAL=$SERE  the binary that evaluates
# Evaluations already in results.jsonl are not run again.
# Runs already finished (final checkpoint present) are not trained again and
# interrupted ones resume from their newest checkpoint, so the script can be
# restarted after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA="${DATA:-/usr/share/datasets/fashion-mnist}"
SEEDS="${SEEDS:-1 2}"
STEPS="${STEPS:-1200}"
THREADS="${THREADS:-2}"
OUT="${OUT:-runs/ablation}"
SERE="${SERE:-target/release/sere}"
SERE_EVAL="${SERE_EVAL:-$SERE}"
FEATURES="${FEATURES:-cls}"
CONFIGS="${CONFIGS:-dino full spatial channel random}"
PHASE="${PHASE:-all}"

if [ ! -e "$DATA/train-images-idx3-ubyte.gz" ] && [ ! -e "$DATA/train-images-idx3-ubyte" ]; then
    echo "ablation.sh: no Fashion-MNIST in $DATA (apt-get install dataset-fashion-mnist, or set DATA)" >&2
    exit 1
fi
if [ -z "${SKIP_BUILD:-}" ]; then
    cargo build --release -p sere-host --bin sere
fi
mkdir -p "$OUT"

# The model and recipe shared by every run: micro preset (dim 128, depth 4,
# heads 4), patch 4 on 28 px globals (7x7 tokens, 7x7 global overlap grid) and
# 4 locals of 12 px (3x3 global-local grid), batch 32, K 1024, lr 5e-3 per 256
# images (peak 6.25e-4), teacher momentum 0.99 -> 1, no warm-up, last layer
# trained from the start (runs are shorter than one epoch). The sizes the
# defaults had when these runs were made are pinned (the defaults have since
# become the recipe of the default synthetic run).
COMMON=(--data "$DATA" --img 28 --local-img 12 --patch 4 --local-overlap 3
        --preset micro --batch 32 --locals 4 --set head_hidden=2048 --set bottleneck=256
        --out-dim 1024 --threads "$THREADS"
        --set momentum_teacher=0.99 --set warmup_epochs=0 --set freeze_last_layer=0
        --set keep_every=$((STEPS / 2)))

# Flags and reported name of each feature set.
feature_flags() {
    case "$1" in
        cls) echo "" ;;
        dino) echo "--last-blocks 4 --avgpool" ;;
        *) echo "ablation.sh: unknown feature set $1" >&2; exit 1 ;;
    esac
}
feature_name() {
    case "$1" in
        cls) echo "teacher_cls" ;;
        dino) echo "teacher_cls_last4+avgpool" ;;
    esac
}

weights() {
    case "$1" in
        dino) echo "0 0" ;;
        spatial) echo "0.2 0" ;;
        channel) echo "0 0.5" ;;
        full | random) echo "0.2 0.5" ;;
        *) echo "ablation.sh: unknown config $1" >&2; exit 1 ;;
    esac
}

for cfg in $CONFIGS; do
    for seed in $SEEDS; do
        read -r alpha beta <<<"$(weights "$cfg")"
        dir="$OUT/$cfg-s$seed"
        if [ "$cfg" = random ]; then
            # One step at lr 1e-12: the initial weights, saved as a checkpoint.
            steps=1
            extra=(--lr 1e-12)
        else
            steps=$STEPS
            extra=(--lr 5e-3)
        fi
        final="$dir/checkpoint-$(printf %08d "$steps").safetensors"
        if [ "$PHASE" != eval ] && [ ! -e "$final" ]; then
            # An interrupted run continues from its newest checkpoint (exact
            # resume); one stopped before its first checkpoint is moved aside
            # to $OUT/incomplete/ (sere train refuses a folder holding a run).
            resume=()
            if compgen -G "$dir/checkpoint-*.safetensors" >/dev/null; then
                resume=(--resume "$dir")
                echo "== resume $cfg seed $seed from $(ls "$dir"/checkpoint-*.safetensors | tail -n 1)"
            elif [ -e "$dir" ]; then
                mkdir -p "$OUT/incomplete"
                aside="$OUT/incomplete/$cfg-s$seed-$(date -u +%Y%m%dT%H%M%S)"
                mv "$dir" "$aside"
                [ -e "$dir.log" ] && mv "$dir.log" "$aside.log"
                echo "== $cfg seed $seed: interrupted before its first checkpoint, moved to $aside"
            fi
            echo "== train $cfg seed $seed ($steps steps) -> $dir"
            start=$(date +%s)
            "$SERE" train "${COMMON[@]}" --alpha "$alpha" --beta "$beta" --seed "$seed" \
                --steps "$steps" "${extra[@]}" --out "$dir" "${resume[@]}" </dev/null >>"$dir.log" 2>&1
            echo "   $(($(date +%s) - start)) s"
        fi
        [ "$PHASE" = train ] && continue
        if [ ! -e "$final" ]; then
            echo "== $cfg seed $seed: not trained yet (no $final), not evaluated"
            continue
        fi
        # The final checkpoint only, unless EVAL_ALL=1 (each evaluation embeds
        # all 70k images: minutes on 2 cores).
        cks=("$final")
        [ -n "${EVAL_ALL:-}" ] && cks=("$dir"/checkpoint-*.safetensors)
        for ck in "${cks[@]}"; do
            step=$(basename "$ck" .safetensors | sed 's/checkpoint-0*//')
            for feat in $FEATURES; do
                flags=$(feature_flags "$feat")
                key="\"config\":\"$cfg\",\"seed\":$seed,\"step\":$step,\"eval\":{\"metric\":\"linear_top1\",\"features\":\"$(feature_name "$feat")\""
                if [ -e "$OUT/results.jsonl" ] && grep -qF "$key" "$OUT/results.jsonl"; then
                    continue
                fi
                # One pass of the backbone: weighted 20-NN, then the linear probe.
                # shellcheck disable=SC2086 # flags are words
                "$SERE_EVAL" eval linear --knn $flags --checkpoint "$ck" --data "$DATA" \
                    --threads "$THREADS" |
                    while read -r line; do
                        echo "{\"config\":\"$cfg\",\"seed\":$seed,\"step\":$step,\"eval\":$line}" |
                            tee -a "$OUT/results.jsonl"
                    done
            done
        done
    done
done
