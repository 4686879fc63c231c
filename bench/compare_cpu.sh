#!/usr/bin/env bash
# CPU comparison of one SERE training step: PyTorch eager (bench/torch_step.py) vs the
# Rust trainer (target/release/sere bench-step), plus the torch.mm fp32 GEMM peak, at
# 1 and 2 threads. Prints the raw JSON lines, then a markdown table. No network needed.
#
# Environment knobs (all optional):
#   THREADS="1 2"        thread counts to run
#   STEPS=10 WARMUP=2     timed / untimed steps per run
#   ROUNDS=1              repeat the whole (gemm, torch, sere) sequence, alternating; the
#                         table then shows the median over rounds of each run's median
#                         and the sere/torch ratio of every round (for shared, noisy hosts)
#   SKIP_BUILD=1          do not run cargo; use the binary as it is
#   SERE=path             the sere binary (default target/release/sere)
#   CARGO_FLAGS=--offline extra flags for `cargo build` (default --offline)
#   PYTHON=python3        interpreter with torch
#   KEEP=DIR              keep the raw JSON/log files in DIR (default: a temp dir, removed)
set -u
cd "$(dirname "$0")/.." || exit 1

THREADS="${THREADS:-1 2}"
STEPS="${STEPS:-10}"
WARMUP="${WARMUP:-2}"
ROUNDS="${ROUNDS:-1}"
PYTHON="${PYTHON:-python3}"
CARGO_FLAGS="${CARGO_FLAGS---offline}"
SERE="${SERE:-target/release/sere}"
# The issue's configuration (head_hidden 2048, bottleneck 256, mlp_ratio 4, drop_path 0.1,
# alpha 0.2, beta 0.5 are both sides' defaults; they are passed explicitly anyway).
CFG=(--img 32 --local-img 16 --patch 4 --dim 192 --depth 6 --heads 3 --batch 32 --locals 4
     --out-dim 4096 --overlap 7 --local-overlap 4 --alpha 0.2 --beta 0.5)
TORCH_EXTRA=(--mlp-ratio 4 --head-hidden 2048 --bottleneck 256 --drop-path 0.1)
SERE_EXTRA=(--device cpu --set head_hidden=2048 --set bottleneck=256 --set mlp_ratio=4.0
            --set drop_path=0.1)

if [ -n "${KEEP:-}" ]; then
    WORK="$KEEP"; mkdir -p "$WORK"
else
    WORK="$(mktemp -d)"; trap 'rm -rf "$WORK"' EXIT
fi

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "compare_cpu.sh: '$PYTHON' cannot import torch; nothing to compare." >&2
    exit 1
fi

# ---- build the Rust side (failure is reported, the PyTorch numbers still come) ----
SERE_STATUS="ok"
SERE_NOTE=""
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    echo "== cargo build --release -p sere-host $CARGO_FLAGS" >&2
    # shellcheck disable=SC2086
    if ! cargo build --release -p sere-host $CARGO_FLAGS >"$WORK/build.log" 2>&1; then
        echo "compare_cpu.sh: cargo build --release -p sere-host FAILED; last lines:" >&2
        tail -n 15 "$WORK/build.log" >&2
        SERE_STATUS="cargo build --release -p sere-host failed (log above)"
    fi
fi
# A failed build may leave an older binary behind: it is still used, with a warning.
if [ "$SERE_STATUS" != "ok" ] && [ -x "$SERE" ] && "$SERE" bench-step --help >/dev/null 2>&1; then
    echo "compare_cpu.sh: WARNING: using the existing (possibly stale) $SERE" >&2
    SERE_STATUS="ok"
    SERE_NOTE="the build failed; the sere rows come from an older $SERE"
fi
if [ ! -x "$SERE" ]; then
    if [ "$SERE_STATUS" = "ok" ]; then SERE_STATUS="binary $SERE missing"
    else SERE_STATUS="$SERE_STATUS; binary $SERE missing"; fi
elif ! "$SERE" bench-step --help >/dev/null 2>&1; then
    SERE_STATUS="$SERE has no working 'bench-step' subcommand"
fi
if [ "$SERE_STATUS" != "ok" ]; then
    echo "compare_cpu.sh: NOTE: Rust side unavailable: $SERE_STATUS; printing PyTorch numbers only." >&2
fi

last_json() {  # the last line that looks like a JSON object, in stdout else stderr
    local line
    line="$(grep -sE '^[[:space:]]*\{' "$1.out" | tail -n 1)"
    [ -z "$line" ] && line="$(grep -sE '^[[:space:]]*\{' "$1.err" | tail -n 1)"
    printf '%s' "$line"
}

for r in $(seq 1 "$ROUNDS"); do
for t in $THREADS; do
    echo "== round $r, threads $t: gemm_peak.py" >&2
    "$PYTHON" bench/gemm_peak.py --threads "$t" >"$WORK/gemm_${t}_$r.out" 2>"$WORK/gemm_${t}_$r.err" \
        || { echo "gemm_peak.py failed:" >&2; tail -n 5 "$WORK/gemm_${t}_$r.err" >&2; }
    echo "== round $r, threads $t: torch_step.py" >&2
    "$PYTHON" bench/torch_step.py "${CFG[@]}" "${TORCH_EXTRA[@]}" --threads "$t" \
        --steps "$STEPS" --warmup "$WARMUP" >"$WORK/torch_${t}_$r.out" 2>"$WORK/torch_${t}_$r.err" \
        || { echo "torch_step.py failed:" >&2; tail -n 5 "$WORK/torch_${t}_$r.err" >&2; }
    grep -h "first-step losses" "$WORK/torch_${t}_$r.err" >&2
    if [ "$SERE_STATUS" = "ok" ]; then
        echo "== round $r, threads $t: sere bench-step" >&2
        if ! "$SERE" bench-step "${CFG[@]}" "${SERE_EXTRA[@]}" --threads "$t" \
            --steps "$STEPS" --warmup "$WARMUP" >"$WORK/sere_${t}_$r.out" 2>"$WORK/sere_${t}_$r.err"; then
            echo "sere bench-step failed (threads $t):" >&2
            tail -n 10 "$WORK/sere_${t}_$r.err" >&2
        fi
    fi
done
done

# The machine every figure below was measured on: CPU model, the instruction
# sets the SGEMMs dispatch on, cores (machines of one kind differ).
machine_line() {
    local model flags
    model="$(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1)"
    flags="$(grep -m1 -o -w -E 'avx2|fma|avx512f|avx512_bf16|amx_tile|amx_bf16' /proc/cpuinfo 2>/dev/null \
        | sort -u | tr '\n' ' ')"
    printf 'machine: %s; flags: %s; %s cores' "${model:-unknown}" "${flags:-none found}" "$(nproc)"
}

echo "### machine"
machine_line
echo
echo
echo "### raw JSON"
for r in $(seq 1 "$ROUNDS"); do
    for t in $THREADS; do
        for k in gemm torch sere; do
            line="$(last_json "$WORK/${k}_${t}_$r")"
            [ -n "$line" ] && echo "$line"
        done
    done
done
echo

SERE_STATUS="$SERE_STATUS" SERE_NOTE="$SERE_NOTE" THREADS="$THREADS" ROUNDS="$ROUNDS" WORK="$WORK" \
    "$PYTHON" - <<'EOF'
import json, os, statistics, sys
sys.path.insert(0, "bench")
from torch_step import step_flops

work, status = os.environ["WORK"], os.environ["SERE_STATUS"]

rounds = int(os.environ["ROUNDS"])

def load_one(kind, t, r):
    for ext in ("out", "err"):
        try:
            lines = [l for l in open(os.path.join(work, f"{kind}_{t}_{r}.{ext}"))
                     if l.lstrip().startswith("{")]
            if lines:
                return json.loads(lines[-1])
        except (OSError, ValueError):
            pass
    return None

def load(kind, t):
    """One record per (kind, threads): the median over rounds of each field
    that is a median or a rate, min of mins, max of maxes, max of peak RSS."""
    runs = [x for x in (load_one(kind, t, r) for r in range(1, rounds + 1)) if x]
    if not runs:
        return None
    out = dict(runs[-1])
    for key in ("median_ms", "images_per_s", "gflop_per_s"):
        vals = [x[key] for x in runs if x.get(key) is not None]
        if vals:
            out[key] = statistics.median(vals)
    for key, pick in (("min_ms", min), ("max_ms", max), ("peak_rss_mb", max)):
        vals = [x[key] for x in runs if x.get(key) is not None]
        if vals:
            out[key] = pick(vals)
    out["_runs"] = runs
    return out

def f(v, fmt):
    return "n/a" if v is None else format(v, fmt)

rows = []
notes = []
print("| threads | impl | ms/step (median) | min-max ms | images/s | peak RSS MB | GFLOP/s | % of GEMM peak | sere/torch time |")
print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
for t in os.environ["THREADS"].split():
    gemm, tor, ser = load("gemm", t), load("torch", t), load("sere", t)
    peak = gemm and gemm.get("gflop_per_s")
    for name, r in (("torch", tor), ("sere", ser)):
        if r is None:
            why = status if name == "sere" and status != "ok" else "no result"
            print(f"| {t} | {name} | {why} | | | | | | |")
            continue
        med = r.get("median_ms")
        # GFLOP/s from the shared formula (torch_step.step_flops) so both rows use the
        # same numerator; a differing self-reported gflop_per_step is flagged below.
        cfg = {"mlp_ratio": 4.0, "head_hidden": 2048, "bottleneck": 256}
        cfg.update(tor or {})
        cfg.update(r)
        try:
            gf = step_flops(cfg) / 1e9
        except (KeyError, TypeError, ZeroDivisionError):
            gf = None
        own = r.get("gflop_per_step")
        if own is not None and gf and abs(own - gf) > 0.01 * gf:
            notes.append(f"{name} @ {t} threads reports gflop_per_step {own:.3f}, formula gives {gf:.3f}")
        gps = gf / (med / 1e3) if (gf and med) else None
        frac = 100.0 * gps / peak if (gps and peak) else None
        ratio = ""
        if name == "sere" and tor and med and tor.get("median_ms"):
            ratio = f"{med / tor['median_ms']:.2f}x"
            if rounds > 1:
                per = [f"{s_['median_ms'] / t_['median_ms']:.2f}"
                       for s_, t_ in zip(r["_runs"], tor["_runs"])]
                notes.append(f"{t} threads, sere/torch per round: {', '.join(per)}")
        if name == "sere" and r.get("cpu_gemm"):
            note = f"sere's CPU SGEMM path: {r['cpu_gemm']} (SERE_GEMM forces one)"
            if note not in notes:
                notes.append(note)
        lo, hi = r.get("min_ms"), r.get("max_ms")
        print(f"| {t} | {name} | {f(med, '.1f')} | {f(lo, '.0f')}-{f(hi, '.0f')} | "
              f"{f(r.get('images_per_s'), '.2f')} | {f(r.get('peak_rss_mb'), '.0f')} | "
              f"{f(gps, '.2f')} | {f(frac, '.1f')} | {ratio} |")
        if r.get("cpu_util") is not None and r["cpu_util"] < 0.8:
            notes.append(f"{name} @ {t} threads: cpu_util {r['cpu_util']} (load avg "
                         f"{r.get('load_avg_1m')}): the cores were shared, times are pessimistic")
    if gemm:
        print(f"| {t} | torch.mm peak | | | | | {gemm['gflop_per_s']:.2f} | 100.0 | |")
print()
print("sere/torch time = sere median ms / torch median ms (below 1: sere is faster).")
print("GFLOP/s use bench/torch_step.py step_flops() (matmul FLOPs, see bench/README.md).")
if status != "ok":
    print(f"NOTE: Rust side not measured: {status}.")
if os.environ.get("SERE_NOTE"):
    print(f"NOTE: {os.environ['SERE_NOTE']}.")
for n in notes:
    print(f"NOTE: {n}")
EOF
