#!/usr/bin/env bash
# Data-parallel scaling on one machine (BENCHMARKS.md, "Data-parallel
# training over MPI"): the default run's model for STEPS steps, ROUNDS
# rounds alternating one process at 1 and 2 threads and `mpirun -n 2` of
# one thread each; prints each run's training time and last images/s.
# Needs a release build with MPI:
#   cargo build --release -p sere-host --features mpi
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-3}"
STEPS="${STEPS:-200}"
bin="$(mktemp -d)/sere" # a copy: a rebuild during the run changes nothing
cp target/release/sere "$bin"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
args=(train --steps "$STEPS" --log-every $((STEPS / 2)) --set final_eval=false)
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'); $(nproc) cores; $(mpirun --version | head -1)"
for round in $(seq "$ROUNDS"); do
  for run in threads1 threads2 ranks2; do
    out="$(mktemp -d)/run"
    case $run in
      threads1) "$bin" "${args[@]}" --threads 1 --out "$out" >/dev/null 2>&1 ;;
      threads2) "$bin" "${args[@]}" --threads 2 --out "$out" >/dev/null 2>&1 ;;
      ranks2) mpirun --oversubscribe --bind-to none -n 2 "$bin" "${args[@]}" --out "$out" >/dev/null 2>&1 ;;
    esac
    last="$(tail -1 "$out/metrics.jsonl")"
    secs="$(grep -o '"elapsed_s":[0-9.]*' <<<"$last" | cut -d: -f2)"
    ips="$(grep -o '"images_per_s":[0-9.]*' <<<"$last" | cut -d: -f2)"
    printf 'round %s %-8s %8.1f s  %7.1f images/s\n' "$round" "$run" "$secs" "$ips"
    rm -rf "$(dirname "$out")"
  done
done
