#!/usr/bin/env bash
# Fashion-MNIST at a fixed step budget (issue 15): SERE (the default run's
# recipe, sized for 28 px images) and the DINO-only baseline (alpha = beta =
# 0, everything else equal), for each seed (and iBOT with and without SERE:
# CONFIGS="ibot ibot-sere"); k-NN of the teacher every
# EVAL_EVERY steps on 5000 / 1000 images (metrics.jsonl, `knn_top1`), then
# the end-of-training evaluation on the full splits (eval.json: 20-NN of the
# trained teacher, of its random initialisation and of raw pixels, and the
# linear probe). Prints a Markdown table of eval.json and the training
# seconds (elapsed_s - eval_s of the last metrics line).
#
# Environment knobs (all optional):
#   DATA=/usr/share/datasets/fashion-mnist   (Debian package dataset-fashion-mnist)
#   SEEDS="1 2"  STEPS=12000  EVAL_EVERY=1000  OUT=runs/fashion
#   CONFIGS="sere dino"   SERE=target/release/sere (SKIP_BUILD=1 to use it as it is)
#   EXTRA="..."  flags added to every run (a sweep)
# A run whose folder already holds eval.json is not trained again.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA="${DATA:-/usr/share/datasets/fashion-mnist}"
SEEDS="${SEEDS:-1 2}"
STEPS="${STEPS:-12000}"
EVAL_EVERY="${EVAL_EVERY:-1000}"
OUT="${OUT:-runs/fashion}"
CONFIGS="${CONFIGS:-sere dino}"
SERE="${SERE:-target/release/sere}"
EXTRA="${EXTRA:-}"

if [ ! -e "$DATA/train-images-idx3-ubyte.gz" ] && [ ! -e "$DATA/train-images-idx3-ubyte" ]; then
    echo "fashion_mnist.sh: no Fashion-MNIST in $DATA (apt-get install dataset-fashion-mnist, or set DATA)" >&2
    exit 1
fi
if [ -z "${SKIP_BUILD:-}" ]; then
    cargo build --release --locked -p sere-host --bin sere
fi
mkdir -p "$OUT"

# The default run's recipe (nano ViT, batch 16, teacher momentum 0.95, K
# 1024, head 512 / 128, lr 2e-2 per 256 images) on 28 px globals and 12 px
# locals with patch 4 (7 x 7 and 3 x 3 tokens).
COMMON=(--data "$DATA" --img 28 --local-img 12 --patch 4 --local-overlap 3
        --steps "$STEPS" --eval-every "$EVAL_EVERY" --keep-every 2000)

# The objective of each configuration: DINO or iBOT (DINO + masked image
# modelling, the CLS head shared as the patch head), with or without SERE's
# relations (issue 13's comparison is CONFIGS="dino sere ibot ibot-sere").
weights() {
    case "$1" in
        sere) echo "--set alpha=0.5 --set beta=3.0" ;;
        dino) echo "--set alpha=0.0 --set beta=0.0" ;;
        ibot) echo "--mim --set alpha=0.0 --set beta=0.0" ;;
        ibot-sere) echo "--mim --set alpha=0.5 --set beta=3.0" ;;
        *) echo "fashion_mnist.sh: unknown config $1" >&2; exit 1 ;;
    esac
}

for seed in $SEEDS; do
    for c in $CONFIGS; do
        dir="$OUT/$c-seed$seed"
        if [ -e "$dir/eval.json" ]; then
            echo "$dir: done, skipped" >&2
            continue
        fi
        # A folder holding checkpoints of an interrupted run: the same
        # command continues it from its newest (DINO's resume).
        # shellcheck disable=SC2046,SC2086
        "$SERE" train "${COMMON[@]}" $(weights "$c") --seed "$seed" --out "$dir" \
            $EXTRA >> "$dir.log" 2>&1 || { tail -n 5 "$dir.log" >&2; exit 1; }
        tail -n 4 "$dir.log" >&2
    done
done

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
print("| run | seed | steps | training s | k-NN teacher | k-NN random init | k-NN raw pixels | linear teacher | linear random init |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for name in sorted(os.listdir(out)):
    ev = os.path.join(out, name, "eval.json")
    if not os.path.exists(ev):
        continue
    r = json.load(open(ev))
    lines = [json.loads(l) for l in open(os.path.join(out, name, "metrics.jsonl")) if l.strip()]
    train_s = lines[-1]["elapsed_s"] - lines[-1].get("eval_s", 0.0)
    c, seed = name.rsplit("-seed", 1)
    pct = lambda v: f"{100 * v:.2f}%"
    print(f"| {c} | {seed} | {r['step']} | {train_s:.0f} | {pct(r['knn_teacher'])} | {pct(r['knn_random_init'])} "
          f"| {pct(r['knn_pixels'])} | {pct(r['linear_teacher'])} | {pct(r['linear_random_init'])} |")
PY
