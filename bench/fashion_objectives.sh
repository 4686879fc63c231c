#!/usr/bin/env bash
# Issue 13's comparison of objectives on Fashion-MNIST at one equal CPU
# budget per run: DINO alone, DINO + SERE, iBOT (DINO + masked image
# modelling, the CLS head shared as the patch head) and iBOT + SERE, each on
# `--recipe cpu-small` (patch 7, 28 / 14 px crops, nano ViT) with only the
# objective changed, two seeds each.
#
# Equal budget, reproducibly: the budget is BUDGET_S seconds of one core per
# run, and each objective gets the steps its measured pace buys (a run's
# cost per step differs: iBOT runs the patch head on every global patch).
# The two seeds of one objective train side by side at one thread each, so
# the pace is measured the same way (PACE=1: 400 steps per seed, the rate
# between steps 100 and 400) and the steps written below are that pace times
# the budget, rounded to hundreds. The runs are deterministic in their
# steps, so what else the machine does changes their wall time only.
#
# Environment knobs (all optional):
#   DATA=/usr/share/datasets/fashion-mnist   OUT=runs/fashion-objectives
#   SERE=target/release/sere (SKIP_BUILD=1 to use it as it is)
#   CONFIGS="dino sere ibot ibot-sere"   SEEDS="1 2"   EVAL_EVERY=2000
#   PACE=1   measure the pace of each objective and print the steps that
#            BUDGET_S (default 900) buys, instead of training
#   STEPS_dino=... STEPS_sere=... STEPS_ibot=... STEPS_ibot_sere=...
#            override the measured steps (defaults: 15 minutes on the Ice
#            Lake Xeon of BENCHMARKS.md, "DINO, SERE and iBOT at one budget")
# A run whose folder holds eval.json is not trained again; an interrupted
# one resumes from its rolling checkpoint (the same command). Ends with
# bench/fashion_report.py's table and OUT/knn_vs_minutes.png (matplotlib).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA="${DATA:-/usr/share/datasets/fashion-mnist}"
OUT="${OUT:-runs/fashion-objectives}"
SERE="${SERE:-target/release/sere}"
CONFIGS="${CONFIGS:-dino sere ibot ibot-sere}"
SEEDS="${SEEDS:-1 2}"
EVAL_EVERY="${EVAL_EVERY:-2000}"
BUDGET_S="${BUDGET_S:-900}"

# Measured with PACE=1 (steps/s, mean of the two side-by-side seeds):
# dino 23.26, sere 18.03, ibot 14.02, ibot-sere 12.42; times 900 s.
STEPS_dino="${STEPS_dino:-20900}"
STEPS_sere="${STEPS_sere:-16200}"
STEPS_ibot="${STEPS_ibot:-12600}"
STEPS_ibot_sere="${STEPS_ibot_sere:-11200}"

if [ ! -e "$DATA/train-images-idx3-ubyte.gz" ] && [ ! -e "$DATA/train-images-idx3-ubyte" ]; then
    echo "fashion_objectives.sh: no Fashion-MNIST in $DATA (apt-get install dataset-fashion-mnist, or set DATA)" >&2
    exit 1
fi
if [ -z "${SKIP_BUILD:-}" ]; then
    cargo build --release --locked -p sere-host --bin sere
fi
mkdir -p "$OUT"

objective() {
    case "$1" in
        dino) echo "--set alpha=0.0 --set beta=0.0" ;;
        sere) echo "--set alpha=0.5 --set beta=3.0" ;;
        ibot) echo "--mim --set alpha=0.0 --set beta=0.0" ;;
        ibot-sere) echo "--mim --set alpha=0.5 --set beta=3.0" ;;
        *) echo "fashion_objectives.sh: unknown config '$1' (dino, sere, ibot, ibot-sere)" >&2; exit 1 ;;
    esac
}

steps_of() { local v="STEPS_${1//-/_}"; echo "${!v}"; }

# Refuse an unknown configuration before anything trains.
for c in $CONFIGS; do objective "$c" >/dev/null; done

# Steps per second between steps 100 and 400 of a metrics.jsonl.
rate() {
    python3 - "$1" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
a = [l for l in lines if l["step"] >= 100]
print(f'{(a[-1]["step"] - a[0]["step"]) / (a[-1]["elapsed_s"] - a[0]["elapsed_s"]):.2f}')
PY
}

if [ -n "${PACE:-}" ]; then
    for c in $CONFIGS; do
        pids=()
        for seed in $SEEDS; do
            dir="$OUT/pace/$c-seed$seed"
            rm -rf "$dir"
            mkdir -p "$OUT/pace"
            # shellcheck disable=SC2046
            "$SERE" train --recipe cpu-small --data "$DATA" $(objective "$c") --seed "$seed" \
                --steps 400 --no-eval --threads 1 --checkpoint-every 0 --keep-every-epochs 0 \
                --out "$dir" > "$dir.log" 2>&1 &
            pids+=($!)
        done
        wait "${pids[@]}"
        rates=()
        for seed in $SEEDS; do rates+=("$(rate "$OUT/pace/$c-seed$seed/metrics.jsonl")"); done
        python3 -c "import sys; r=[float(x) for x in sys.argv[3:]]; m=sum(r)/len(r); \
print(f'{sys.argv[1]}: {m:.2f} steps/s (seeds: {\" \".join(sys.argv[3:])}); {int(sys.argv[2])} s buy {round(m*int(sys.argv[2]), -2):.0f} steps')" \
            "$c" "$BUDGET_S" "${rates[@]}"
    done
    exit 0
fi

for c in $CONFIGS; do
    steps="$(steps_of "$c")"
    pids=()
    for seed in $SEEDS; do
        dir="$OUT/$c-seed$seed"
        if [ -e "$dir/eval.json" ]; then
            echo "$dir: done, skipped" >&2
            continue
        fi
        # shellcheck disable=SC2046
        "$SERE" train --recipe cpu-small --data "$DATA" $(objective "$c") --seed "$seed" \
            --steps "$steps" --eval-every "$EVAL_EVERY" --threads 1 --out "$dir" \
            >> "$dir.log" 2>&1 &
        pids+=($!)
    done
    for p in "${pids[@]}"; do
        wait "$p" || { echo "fashion_objectives.sh: a $c run failed; see $OUT/$c-seed*.log" >&2; exit 1; }
    done
done

# The table (per run and mean of seeds) and the curves, at the paces the
# steps were bought with (steps x 16 images / BUDGET_S): bench/fashion_report.py.
paces=()
for c in $CONFIGS; do paces+=(--pace "$c=$(( $(steps_of "$c") * 16 / BUDGET_S ))"); done
python3 bench/fashion_report.py "$OUT" "$OUT/knn_vs_minutes.png" "${paces[@]}" \
    --xlabel "training minutes of one core (the other seed beside it), evaluation excluded"
