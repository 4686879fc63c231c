#!/usr/bin/env bash
# Short-run recipe sweep on Fashion-MNIST (issue 15): each configuration
# changes one thing of the base recipe (bench/fashion_mnist.sh's "sere"),
# trains STEPS steps and is ranked by the teacher's weighted 20-NN top-1 on
# the monitor's held-out subset (5000 training / 1000 test images, logged in
# metrics.jsonl as `knn_top1`). No end-of-training evaluation: the sweep
# ranks, the full runs (bench/fashion_mnist.sh) report.
#
# The sweep trains on a quarter of the training images (--train-images
# 15000, spread evenly), so its 3000 steps are 3.2 epochs of 937 steps as
# the full run's 12000 are 3.2 epochs of 3750: every schedule counted in
# epochs (the one-epoch warm-up above all: without it the DINO term
# collapses to the uniform distribution) keeps its shape.
#
# Environment knobs (all optional):
#   DATA=/usr/share/datasets/fashion-mnist   STEPS=3000   TRAIN_IMAGES=15000   SEED=1
#   OUT=runs/fashion-sweep   SERE=target/release/sere (SKIP_BUILD=1 to use it as it is)
#   ONLY="base lr-x2"   run only these configurations (default: all)
#   ROUND=p4   the base the configurations change: p4, the first round's
#            (patch 4, 12 px locals), or p7, the second round's on its winner
#            (patch 7: 4 x 4 tokens on 28 px, 2 x 2 on 14 px locals); the
#            default OUT is then runs/fashion-sweep-p7
#   NICE=1   run below normal priority (the sweep then shares the machine;
#            its images/s column is not a clean speed figure)
# A configuration whose folder holds a finished metrics.jsonl is not run
# again; the table is printed from whatever folders exist.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA="${DATA:-/usr/share/datasets/fashion-mnist}"
STEPS="${STEPS:-3000}"
TRAIN_IMAGES="${TRAIN_IMAGES:-15000}"
SEED="${SEED:-1}"
ROUND="${ROUND:-p4}"
case "$ROUND" in
    p4) OUT="${OUT:-runs/fashion-sweep}" ;;
    p7) OUT="${OUT:-runs/fashion-sweep-p7}" ;;
    *) echo "fashion_sweep.sh: ROUND must be p4 or p7, not '$ROUND'" >&2; exit 1 ;;
esac
SERE="${SERE:-target/release/sere}"
ONLY="${ONLY:-}"
PRIO=()
if [ -n "${NICE:-}" ]; then PRIO=(nice -n 19); fi

if [ ! -e "$DATA/train-images-idx3-ubyte.gz" ] && [ ! -e "$DATA/train-images-idx3-ubyte" ]; then
    echo "fashion_sweep.sh: no Fashion-MNIST in $DATA (apt-get install dataset-fashion-mnist, or set DATA)" >&2
    exit 1
fi
if [ -z "${SKIP_BUILD:-}" ]; then
    cargo build --release --locked -p sere-host --bin sere
fi
mkdir -p "$OUT"

# The first round's base (ROUND=p4): the default run's recipe on 28 px
# globals and 12 px locals with patch 4, SERE weights alpha 0.5 / beta 3.0
# (bench/fashion_mnist.sh). A configuration's flags replace the base's flag
# of the same name.
if [ "$ROUND" = p4 ]; then
    BASE=("--img 28" "--local-img 12" "--patch 4" "--overlap 7" "--local-overlap 3"
          "--alpha 0.5" "--beta 3.0")
    # name | flags that replace or add to the base's.
    CONFIGS=(
        "base|"
        "dino-only|--alpha 0 --beta 0"
        "lr-x2|--lr 0.04"
        "lr-half|--lr 0.01"
        "momentum-0.98|--momentum-teacher 0.98"
        "teacher-temp-0.07|--teacher-temp 0.07 --warmup-teacher-temp 0.07"
        "K-4096|--out-dim 4096"
        "locals-8|--locals 8"
        "local-16px|--local-img 16 --local-overlap 4"
        "scales-0.25|--global-scale 0.25 1.0 --local-scale 0.05 0.25"
        "patch-7|--patch 7 --local-img 14 --overlap 4 --local-overlap 2"
        "dim-128|--dim 128"
        "authors-weights|--alpha 0.2 --beta 0.5"
        "mim|--mim"
    )
else
    # The second round (ROUND=p7): the first round's winner, patch 7, is the
    # base; the changes the first round did not get to, with the locals'
    # size moved to a multiple of 7.
    BASE=("--img 28" "--local-img 14" "--patch 7" "--overlap 4" "--local-overlap 2"
          "--alpha 0.5" "--beta 3.0")
    CONFIGS=(
        "base|"
        "lr-half|--lr 0.01"
        "locals-8|--locals 8"
        "local-21px|--local-img 21 --local-overlap 3"
        "scales-0.25|--global-scale 0.25 1.0 --local-scale 0.05 0.25"
        "scales-narrow|--global-scale 0.6 1.0 --local-scale 0.2 0.6"
        "scales-0.8|--global-scale 0.8 1.0 --local-scale 0.3 0.8"
        "scales-narrow-lr-half|--global-scale 0.6 1.0 --local-scale 0.2 0.6 --lr 0.01"
        "dim-128|--dim 128"
        "depth-6|--depth 6"
        "authors-weights|--alpha 0.2 --beta 0.5"
        "mim|--mim"
    )
fi

# The base's flags with those `$1` names replaced, then the rest of `$1`.
merged() {
    local over="$1" out=() f
    for f in "${BASE[@]}"; do
        [[ " $over " == *" ${f%% *} "* ]] || out+=("$f")
    done
    echo "${out[*]} $over"
}

wanted() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }

finished() {
    [ -e "$1/metrics.jsonl" ] && python3 - "$1/metrics.jsonl" "$STEPS" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
sys.exit(0 if lines and lines[-1]["step"] >= int(sys.argv[2]) else 1)
PY
}

for entry in "${CONFIGS[@]}"; do
    name="${entry%%|*}"
    flags="${entry#*|}"
    wanted "$name" || continue
    dir="$OUT/$name"
    if finished "$dir"; then
        echo "$dir: done, skipped" >&2
        continue
    fi
    rm -rf "$dir"
    echo "$name: $flags" >&2
    # shellcheck disable=SC2086
    "${PRIO[@]}" "$SERE" train --data "$DATA" $(merged "$flags") --seed "$SEED" --out "$dir" \
        --steps "$STEPS" --train-images "$TRAIN_IMAGES" --eval-every $((STEPS / 2)) --no-eval \
        --checkpoint-every "$STEPS" --keep-last 1 \
        > "$dir.log" 2>&1 || { tail -n 5 "$dir.log" >&2; exit 1; }
    printf '%s\n' "$flags" > "$dir/sweep-flags"
done

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
rows = []
for name in sorted(os.listdir(out)):
    m = os.path.join(out, name, "metrics.jsonl")
    if not os.path.exists(m):
        continue
    lines = [json.loads(l) for l in open(m) if l.strip()]
    knn = [(l["step"], l["knn_top1"]) for l in lines if l.get("knn_top1") is not None]
    if not knn:
        continue
    flags_file = os.path.join(out, name, "sweep-flags")
    if not os.path.exists(flags_file):
        continue  # still training (the flags are written when a run ends)
    flags = open(flags_file).read().strip()
    last = lines[-1]
    train_s = last["elapsed_s"] - last.get("eval_s", 0.0)
    rows.append((knn[-1][1], name, flags, knn, train_s, last))
rows.sort(key=lambda r: -r[0])
print("| config | flags | k-NN at half | k-NN at end | final DINO loss | teacher entropy | training s |")
print("|---|---|---:|---:|---:|---:|---:|")
for top1, name, flags, knn, train_s, last in rows:
    half = f"{100 * knn[0][1]:.1f}%" if len(knn) > 1 else "-"
    print(f"| {name} | `{flags or '(base)'}` | {half} | {100 * top1:.1f}% | {last['loss_dino']:.3f} "
          f"| {last['teacher_entropy']:.2f} | {train_s:.0f} |")
PY
