#!/usr/bin/env bash
# Per-kernel forward + backward, sere-core (host/examples/bench_kernels.rs, batch of images
# split over rayon threads) vs PyTorch eager (bench/torch_kernels.py, batched calls), at 1
# and 2 threads, at the authors' per-image shapes. Prints the raw JSON lines, then a
# markdown table with the ratio sere / torch (below 1: sere is faster).
#
# Environment knobs: THREADS="1 2" BATCH=8 REPS=20 PYTHON=python3 SKIP_BUILD=1
#   BIN=path (default target/release/examples/bench_kernels)
set -euo pipefail
cd "$(dirname "$0")/.."

THREADS="${THREADS:-1 2}"
BATCH="${BATCH:-8}"
REPS="${REPS:-20}"
PYTHON="${PYTHON:-python3}"
BIN="${BIN:-target/release/examples/bench_kernels}"

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "compare_kernels.sh: '$PYTHON' cannot import torch (pip install torch==2.15.0 numpy)" >&2
    exit 1
fi
if [ -z "${SKIP_BUILD:-}" ]; then
    cargo build --release -p sere-host --example bench_kernels
fi
WORK="$(mktemp -d)"; trap 'rm -rf "$WORK"' EXIT
for t in $THREADS; do
    "$BIN" --threads "$t" --batch "$BATCH" --reps "$REPS" | tee -a "$WORK/all.jsonl"
    "$PYTHON" bench/torch_kernels.py --threads "$t" --batch "$BATCH" --reps "$REPS" | tee -a "$WORK/all.jsonl"
done
"$PYTHON" - "$WORK/all.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
t = {}
rss = {}
for r in rows:
    if "kernel" in r:
        t[(r["kernel"], r["threads"], r["impl"])] = r["median_ms"]
    else:
        rss.setdefault(r["impl"], []).append(r["peak_rss_mb"])
threads = sorted({k[1] for k in t})
kernels = list(dict.fromkeys(k[0] for k in t))
head = "| kernel (fwd+bwd, batch %s) |" % rows[0].get("batch", "?")
for th in threads:
    head += f" sere {th}t ms | torch {th}t ms | ratio {th}t |"
print()
print(head)
print("|---" * (1 + 3 * len(threads)) + "|")
for k in kernels:
    line = f"| {k} |"
    for th in threads:
        s, p = t.get((k, th, "sere")), t.get((k, th, "torch"))
        line += f" {s:.3f} | {p:.3f} | {s / p:.2f} |" if s and p else " - | - | - |"
    print(line)
print()
print("peak RSS (MiB, per process):", {k: max(v) for k, v in rss.items()})
PY
