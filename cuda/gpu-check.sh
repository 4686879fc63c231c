#!/usr/bin/env bash
# Runs the prebuilt sere-cuda checks on a GPU machine that has the CUDA 13
# driver and PyTorch but no Rust toolchain and no network, and prints a
# short table. Finishes within 8 minutes (every step has a time limit taken
# from what is left of that budget).
#
# Make the bundle on a development machine first (see cuda/README.md):
#   bash cuda/bundle.sh            # -> .gpu-bundle/ (tests/*, gpu-check.sh, sere if built)
# then, on the GPU machine, from the repository root or anywhere:
#   bash .gpu-bundle/gpu-check.sh  # or: bash cuda/gpu-check.sh [BUNDLE_DIR]
#
# Libraries: libcuda comes with the driver; NVRTC and cuBLAS are taken from
# PyTorch's wheels (site-packages/nvidia/*/lib), a CUDA toolkit under
# /usr/local/cuda*, or BUNDLE/lib, whichever exist (LD_LIBRARY_PATH).
# Logs go to $OUT if set (the device tool's output folder), else BUNDLE/results.
set -uo pipefail

budget_s=480
t0=$(date +%s)
here="$(cd "$(dirname "$0")" && pwd)"
if [ $# -ge 1 ]; then
  bundle="$(cd "$1" && pwd)"
elif [ -d "$here/tests" ]; then
  bundle="$here"
else
  bundle="$(cd "$here/.." && pwd)/.gpu-bundle"
fi
if [ ! -d "$bundle/tests" ]; then
  echo "no bundle at $bundle (build one with: bash cuda/bundle.sh)" >&2
  exit 2
fi
results="${OUT:-$bundle/results}"
mkdir -p "$results"
echo "bundle: $bundle ($(cat "$bundle/COMMIT" 2>/dev/null || echo 'commit ?')), logs: $results"

# ---- environment ------------------------------------------------------------
libdirs=()
# The bundle's NVRTC 13.0 (xz) first: a newer NVRTC from PyTorch's wheels
# emits PTX that an older driver rejects (the kernels then fall back to CUBIN,
# which the second parity pass checks anyway).
if ls "$bundle"/lib/*.xz >/dev/null 2>&1; then
  nvrtc_dir="${TMPDIR:-/tmp}/sere-gpu-check-lib"
  mkdir -p "$nvrtc_dir"
  for z in "$bundle"/lib/*.xz; do
    f="$nvrtc_dir/$(basename "$z" .xz)"
    [ -s "$f" ] && continue
    if command -v xz >/dev/null 2>&1; then
      xz -dc "$z" >"$f.tmp" && mv "$f.tmp" "$f"
    else
      python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$z" "$f"
    fi
  done
  libdirs+=("$nvrtc_dir")
fi
[ -d "$bundle/lib" ] && libdirs+=("$bundle/lib")
if command -v python3 >/dev/null 2>&1; then
  while IFS= read -r d; do libdirs+=("$d"); done < <(python3 - <<'PY' 2>/dev/null
import glob, os, site, sys
roots = list(getattr(site, "getsitepackages", lambda: [])()) + [site.getusersitepackages()] + sys.path
seen = []
for r in roots:
    for pat in ("nvidia/*/lib", "nvidia/cu13/lib", "torch/lib"):
        for d in sorted(glob.glob(os.path.join(r, pat))):
            if d in seen:
                continue
            if glob.glob(os.path.join(d, "libnvrtc.so*")) or glob.glob(os.path.join(d, "libcublas*.so*")):
                seen.append(d)
                print(d)
PY
)
fi
for d in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /usr/local/cuda-12*/lib64; do
  [ -d "$d" ] && libdirs+=("$d")
done
ld=""
for d in "${libdirs[@]}"; do ld="${ld:+$ld:}$d"; done
export LD_LIBRARY_PATH="$ld${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
for lib in libnvrtc.so libcublas.so; do
  found="$(for d in "${libdirs[@]}"; do ls "$d"/$lib* 2>/dev/null; done | head -3 | tr '\n' ' ')"
  echo "$lib: ${found:-not found}"
done
# ptxas for tests/ptx (optional here; CI runs it): a CUDA 13 toolkit's or
# Triton's (ships with PyTorch), only if it is release 13 (older ones cannot
# read the PTX ISA of NVRTC 13).
if [ -z "${SERE_PTXAS:-}" ]; then
  for p in /usr/local/cuda/bin/ptxas \
    $(python3 -c 'import triton, os; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas"))' 2>/dev/null); do
    if [ -x "$p" ] && "$p" --version 2>/dev/null | grep -q "release 13"; then
      export SERE_PTXAS="$p"
      break
    fi
  done
  [ -z "${SERE_PTXAS:-}" ] && export SERE_PTXAS=/nonexistent/ptxas
fi
echo "ptxas: $SERE_PTXAS"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null ||
  echo "nvidia-smi: not available"

# ---- steps -------------------------------------------------------------------
rows=()
overall=0

left() { echo $((budget_s - ($(date +%s) - t0))); }

# run_step NAME REQUIRED(1/0) LIMIT_S CMD...: runs CMD with a time limit,
# logs to $results/NAME.log, records a table row.
run_step() {
  local name="$1" required="$2" limit="$3"
  shift 3
  local remain
  remain=$(left)
  if [ "$remain" -le 15 ]; then
    rows+=("| $name | not run (8-minute budget spent) | | | | |")
    [ "$required" = 1 ] && overall=1
    return
  fi
  [ "$limit" -gt $((remain - 10)) ] && limit=$((remain - 10))
  local log="$results/$name.log" s e rc
  s=$(date +%s)
  timeout "$limit" "$@" >"$log" 2>&1
  rc=$?
  e=$(($(date +%s) - s))
  local passed failed skipped status
  passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
  failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
  skipped=$(grep -c '^skipped:' "$log")
  if [ "$rc" = 124 ]; then
    status="TIMEOUT (${limit}s)"
  elif [ "$rc" = 0 ]; then
    status="ok"
  else
    status="FAILED (exit $rc)"
  fi
  [ "$rc" != 0 ] && [ "$required" = 1 ] && overall=1
  rows+=("| $name | $status | $passed | $failed | $skipped | $e |")
  echo "-- $name: $status (log: $log)"
  if [ "$rc" != 0 ]; then
    grep -E "panicked|relative error .*>=|Error|error" "$log" | head -8
  fi
}

t="$bundle/tests"
[ -x "$t/probe" ] && run_step probe 1 60 "$t/probe" --nocapture
grep -E "^(probe|Gpu::new)" "$results/probe.log" 2>/dev/null
for u in "$t"/unit_*; do
  [ -x "$u" ] && run_step "$(basename "$u")" 1 60 "$u"
done
# Parity twice: kernels as PTX (the default when NVRTC is not newer than the
# driver) and as CUBIN (the fallback when it is).
if [ -x "$t/parity" ]; then
  SERE_REQUIRE_GPU=1 run_step parity 1 200 "$t/parity" --nocapture
  SERE_REQUIRE_GPU=1 SERE_CUDA_KERNEL_FORMAT=cubin run_step parity_cubin 1 120 "$t/parity" --nocapture
fi
for p in parity parity_cubin; do
  if [ -f "$results/$p.log" ]; then
    worst=$(grep -Eo 'relative error [0-9.e+-]+' "$results/$p.log" | awk '{print $3}' | sort -g | tail -1)
    echo "$p: worst relative error ${worst:-n/a} (limit 1e-5)"
  fi
done
[ -x "$t/ptx" ] && run_step ptx 0 60 "$t/ptx" --nocapture

# ---- HOOK 1: the host's backend tests -----------------------------------------
# cuda/bundle.sh builds and copies them:
# - host_unit: sere-host's library tests, among them the CUDA backend's
#   per-op parity tests against the CPU (backend::cuda::device::tests);
# - host_vit, host_heads: the ViT and heads PyTorch float64 and
#   finite-difference tests, one body per backend (their `::cuda` tests);
# - host_gpu_step: tests/gpu_step.rs, a tiny model, three steps on the CPU
#   and the CUDA engine from the same seed and batch, losses within 1e-4
#   relative and parameters within 1e-4, then a checkpoint round trip.
hook_host_tests() {
  local name filter
  for name in host_unit host_vit host_heads host_gpu_step; do
    filter=""
    [ "$name" = host_unit ] && filter="backend::cuda"
    if [ -x "$t/$name" ]; then
      SERE_REQUIRE_GPU=1 run_step "$name" 1 150 "$t/$name" $filter --nocapture --test-threads=1
    else
      rows+=("| $name (hook) | not provided (no tests/$name in the bundle) | | | | |")
    fi
  done
}
hook_host_tests

# ---- HOOK 2: `sere bench-step --device cuda` vs PyTorch at ViT-S/16 ------------
# The issue's configuration: 224/96 px crops, patch 16, dim 384, depth 12,
# 6 heads, batch 64, 10 local crops, K = 8192, 13x13 / 6x6 overlap grids
# (DINO head 2048/256 on both sides: the defaults). Both print one JSON line
# (ms/step, images/s, memory). Few steps: the 8-minute budget.
hook_bench() {
  local BENCH_ARGS="--img 224 --local-img 96 --patch 16 --dim 384 --depth 12 --heads 6 --batch 64 --locals 10 --out-dim 8192 --overlap 13 --local-overlap 6 --steps 5 --warmup 2"
  local TORCH_BENCH="$bundle/bench/torch_step.py"
  if [ ! -x "$bundle/sere" ]; then
    rows+=("| bench-step cuda (hook) | not provided yet (no sere binary) | | | | |")
    return
  fi
  if ! "$bundle/sere" bench-step --help 2>&1 | grep -q -- "--device"; then
    rows+=("| bench-step cuda (hook) | not provided yet (no --device flag) | | | | |")
    return
  fi
  # shellcheck disable=SC2086
  run_step bench_sere_cuda 0 150 "$bundle/sere" bench-step --device cuda $BENCH_ARGS
  grep -E '^\{' "$results/bench_sere_cuda.log" 2>/dev/null | tail -1
  if [ -f "$TORCH_BENCH" ] && command -v python3 >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    run_step bench_torch_cuda 0 150 python3 "$TORCH_BENCH" --device cuda $BENCH_ARGS
    grep -E '^\{' "$results/bench_torch_cuda.log" 2>/dev/null | tail -1
  fi
}
hook_bench

# ---- table -------------------------------------------------------------------
echo
echo "| step | status | passed | failed | skipped | seconds |"
echo "|---|---|---:|---:|---:|---:|"
for r in "${rows[@]}"; do echo "$r"; done
echo
echo "total: $(($(date +%s) - t0)) s of ${budget_s} s; overall: $([ $overall = 0 ] && echo ok || echo FAILED)"
exit $overall
