#!/usr/bin/env bash
# The default run (issue 15): `sere train` with no arguments but --seed and
# --out, once per seed, timed; then a Markdown table of its end-of-training
# evaluation (eval.json: weighted 20-NN of the random initialisation, the
# trained teacher and raw pixels, and the linear probe) and the wall time.
#
# Environment knobs (all optional):
#   SEEDS="0 1 2"  OUT=runs/default  SERE=target/release/sere (SKIP_BUILD=1 to
#   use it as it is)  EXTRA="..." flags added to every run (e.g. for a sweep)
# A seed whose folder already holds eval.json is not trained again.
set -euo pipefail
cd "$(dirname "$0")/.."

SEEDS="${SEEDS:-0 1 2}"
OUT="${OUT:-runs/default}"
SERE="${SERE:-target/release/sere}"
EXTRA="${EXTRA:-}"

if [ -z "${SKIP_BUILD:-}" ]; then
    cargo build --release --locked -p sere-host --bin sere
fi
mkdir -p "$OUT"
for seed in $SEEDS; do
    dir="$OUT/seed-$seed"
    if [ -e "$dir/eval.json" ]; then
        echo "seed $seed: $dir/eval.json exists, skipped" >&2
        continue
    fi
    start=$(date +%s.%N)
    # shellcheck disable=SC2086
    "$SERE" train --seed "$seed" --out "$dir" $EXTRA > "$dir.log" 2> "$dir.err"
    end=$(date +%s.%N)
    echo "$end - $start" | bc > "$dir/wall_s"
    tail -n 5 "$dir.log" >&2
done

python3 - "$OUT" $SEEDS <<'EOF'
import json, sys
out, seeds = sys.argv[1], sys.argv[2:]
print("| seed | k-NN random init | k-NN trained teacher | k-NN raw pixels | teacher - pixels | linear random init | linear trained teacher | wall time (train + eval) |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|")
rows = []
for s in seeds:
    r = json.load(open(f"{out}/seed-{s}/eval.json"))
    wall = float(open(f"{out}/seed-{s}/wall_s").read())
    rows.append(r)
    pct = lambda v: f"{100 * v:.1f}%"
    print(f"| {s} | {pct(r['knn_random_init'])} | {pct(r['knn_teacher'])} | {pct(r['knn_pixels'])} "
          f"| {100 * (r['knn_teacher'] - r['knn_pixels']):+.1f} | {pct(r['linear_random_init'])} "
          f"| {pct(r['linear_teacher'])} | {wall:.0f} s (eval {r['seconds']:.0f} s) |")
if len(rows) > 1:
    mean = lambda k: sum(r[k] for r in rows) / len(rows)
    print(f"| mean | {100 * mean('knn_random_init'):.1f}% | {100 * mean('knn_teacher'):.1f}% "
          f"| {100 * mean('knn_pixels'):.1f}% | {100 * (mean('knn_teacher') - mean('knn_pixels')):+.1f} "
          f"| {100 * mean('linear_random_init'):.1f}% | {100 * mean('linear_teacher'):.1f}% | |")
EOF
