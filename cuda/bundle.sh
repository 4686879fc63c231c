#!/usr/bin/env bash
# Builds the sere-cuda test executables (release) and copies them into
# .gpu-bundle/ (git-ignored), with cuda/gpu-check.sh and, when it has been
# built, the `sere` binary (target/release/sere), for a GPU machine that has
# no Rust toolchain and no network:
#
#   bash cuda/bundle.sh            # here: build + copy (a few minutes on 2 cores)
#   bash .gpu-bundle/gpu-check.sh  # there: run and print a table (< 8 minutes)
#
# The executables are the ones `cargo test --release --no-run -p sere-cuda
# --message-format=json` lists (one per tests/*.rs plus the library's unit
# tests), and NVRTC 13.0 (xz). Debug info is stripped to keep the bundle
# small (the device tool carries at most 64 MiB; the bundle is about 37 MB).
# Also builds and bundles sere-host's backend tests (tests/host_unit,
# host_vit, host_heads, host_gpu_step) and target/release/sere, plus bench/
# (torch_step.py).
# Options:
#   --with-sere   accepted for compatibility (sere is always built now)
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
out="$root/.gpu-bundle"

for a in "$@"; do
  case "$a" in
    --with-sere) ;;
    *) echo "usage: bash cuda/bundle.sh [--with-sere]" >&2; exit 2 ;;
  esac
done
target="${CARGO_TARGET_DIR:-$root/target}"

rm -rf "$out"
mkdir -p "$out/tests"
echo "== building the sere-cuda test executables (release)"
CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=debuginfo \
  cargo test --release --no-run -p sere-cuda --locked --message-format=json >"$out/build.json"
python3 - "$out" <<'PY'
import json, shutil, sys, os
out = sys.argv[1]
n = 0
for line in open(os.path.join(out, "build.json")):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    if not m.get("profile", {}).get("test"):
        continue
    name = m["target"]["name"]
    kind = m["target"]["kind"][0]
    dst = os.path.join(out, "tests", name if kind != "lib" else "unit_" + name)
    shutil.copy2(m["executable"], dst)
    n += 1
    print(f"  {os.path.basename(dst)} <- {m['executable']}")
if n == 0:
    sys.exit("no test executables in cargo's output")
PY
rm -f "$out/build.json"

# The host's tests that run on every backend (gpu-check.sh HOOK 1): the CUDA
# backend's per-op parity tests (the library's unit tests), the ViT and heads
# PyTorch float64 / finite-difference tests (one body per backend) and the
# CPU-vs-GPU step test; then the `sere` binary (HOOK 2: bench-step --device
# cuda), all release, debug info off. Same profile settings as above (the
# dependencies are built once); the copies are then stripped of all symbols
# where `strip` exists, so the bundle stays under the device tool's 64 MiB.
echo "== building sere-host's backend tests and sere (release)"
CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=debuginfo \
  cargo test --release --no-run -p sere-host --lib --test gpu_step --test vit --test heads \
  --locked --message-format=json >"$out/build.json"
python3 - "$out" <<'PY'
import json, shutil, sys, os
out = sys.argv[1]
want = {"sere_host": "host_unit", "gpu_step": "host_gpu_step", "vit": "host_vit", "heads": "host_heads"}
found = set()
for line in open(os.path.join(out, "build.json")):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    name = m.get("target", {}).get("name")
    if m.get("reason") == "compiler-artifact" and m.get("executable") and name in want:
        dst = os.path.join(out, "tests", want[name])
        shutil.copy2(m["executable"], dst)
        print(f"  {want[name]} <- {m['executable']}")
        found.add(name)
missing = set(want) - found
if missing:
    sys.exit(f"no test executable for {sorted(missing)} in cargo's output")
PY
rm -f "$out/build.json"
CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=debuginfo \
  cargo build --release -p sere-host --bin sere --locked
if [ -x "$target/release/sere" ]; then
  cp "$target/release/sere" "$out/sere"
  echo "  sere <- $target/release/sere"
  if command -v strip >/dev/null 2>&1; then
    strip -s "$out/sere" "$out"/tests/host_*
  fi
else
  echo "  (no $target/release/sere: the bench hooks of gpu-check.sh will say so)"
fi
# NVRTC 13.0.88, the version CI pins, xz-compressed (about 31 MB): the GPU
# machine's PyTorch wheels may carry a newer NVRTC whose PTX its driver
# rejects. gpu-check.sh unpacks it and puts it first on LD_LIBRARY_PATH.
echo "== NVRTC 13.0.88 (xz) for the bundle"
python3 -m pip install --user --quiet --disable-pip-version-check --root-user-action=ignore \
  nvidia-cuda-nvrtc==13.0.88
cu13lib="$(python3 -c 'import site; print(site.getusersitepackages())')/nvidia/cu13/lib"
cache="$target/nvrtc-13.0.88-xz"
mkdir -p "$cache" "$out/lib"
for f in libnvrtc.so.13 libnvrtc-builtins.so.13.0; do
  if [ ! -f "$cache/$f.xz" ] || [ "$cu13lib/$f" -nt "$cache/$f.xz" ]; then
    xz -T2 -6 -c "$cu13lib/$f" >"$cache/$f.xz.tmp" && mv "$cache/$f.xz.tmp" "$cache/$f.xz"
  fi
  cp "$cache/$f.xz" "$out/lib/"
done
cp cuda/gpu-check.sh "$out/gpu-check.sh"
# The PyTorch counterparts of the benchmarks, for gpu-check.sh's bench hook.
[ -d bench ] && cp -r bench "$out/bench"
git rev-parse --short HEAD >"$out/COMMIT" 2>/dev/null || true
du -sh "$out"
bytes=$(du -sb "$out" | cut -f1)
if [ "$bytes" -gt $((64 * 1024 * 1024)) ]; then
  echo "bundle is $bytes bytes, over the device tool's 64 MiB" >&2
  exit 1
fi
echo "bundle ready: $out (run: bash $out/gpu-check.sh)"
