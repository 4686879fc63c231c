#!/usr/bin/env bash
# Interleaved A/B of two `sere` binaries' training step (`sere bench-step`,
# the configuration of bench/compare_cpu.sh): for a refactor that must not
# change CPU speed. Each round runs A then B at every thread count, so a
# slow phase of a shared host hits both; prints every run's JSON line, then
# per thread count the median over rounds of each binary's median ms/step
# and the B/A ratio of every round.
#
#   bash bench/ab_step.sh OLD_SERE NEW_SERE      # env: ROUNDS=3 THREADS="1 2" STEPS=8 WARMUP=2
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 SERE_A SERE_B" >&2; exit 2; }
A="$1" B="$2"
ROUNDS="${ROUNDS:-3}" THREADS="${THREADS:-1 2}" STEPS="${STEPS:-8}" WARMUP="${WARMUP:-2}"
CFG=(--img 32 --local-img 16 --patch 4 --dim 192 --depth 6 --heads 3 --batch 32 --locals 4
     --out-dim 4096 --overlap 7 --local-overlap 4 --alpha 0.2 --beta 0.5 --device cpu
     --set head_hidden=2048 --set bottleneck=256 --set mlp_ratio=4.0 --set drop_path=0.1)
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'); flags: $(grep -o -w 'avx2\|fma\|avx512f\|avx512_bf16\|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')"
log="$(mktemp)"; trap 'rm -f "$log"' EXIT
for r in $(seq "$ROUNDS"); do
  for t in $THREADS; do
    for label in A B; do
      bin="$A"; [ "$label" = B ] && bin="$B"
      line="$("$bin" bench-step "${CFG[@]}" --threads "$t" --steps "$STEPS" --warmup "$WARMUP" 2>/dev/null | tail -n 1)"
      echo "round $r threads $t $label $line"
      echo "$r $t $label $line" >>"$log"
    done
  done
done
python3 - "$log" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    r, t, label, js = line.split(" ", 3)
    runs.setdefault(int(t), {}).setdefault(label, {})[int(r)] = json.loads(js)
print("\n| threads | A ms/step (median of rounds) | B ms/step | B/A | B/A per round | A RSS MB | B RSS MB |")
print("|---:|---:|---:|---:|---|---:|---:|")
for t, by in sorted(runs.items()):
    a, b = by["A"], by["B"]
    ma = statistics.median(v["median_ms"] for v in a.values())
    mb = statistics.median(v["median_ms"] for v in b.values())
    per = ", ".join(f"{b[r]['median_ms'] / a[r]['median_ms']:.3f}" for r in sorted(a))
    ra = max(v["peak_rss_mb"] for v in a.values()); rb = max(v["peak_rss_mb"] for v in b.values())
    print(f"| {t} | {ma:.1f} | {mb:.1f} | {mb / ma:.3f} | {per} | {ra:.0f} | {rb:.0f} |")
PY
