#!/usr/bin/env bash
# The project's test command (README.md): installs what the tests need beyond
# cargo, then runs formatting, lints, the whole test suite and the no_std build.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== toolchain components"
rustup component add rustfmt clippy >/dev/null 2>&1 || true
# no_std proof: sere-core must build for a bare-metal Cortex-M4F target.
rustup target add thumbv7em-none-eabihf

echo "== Open MPI (the data-parallel tests: host/tests/mpi.rs, feature mpi)"
# rsmpi's build generates its bindings with libclang from mpi.h; the tests
# start ranks with mpirun.
if ! command -v mpirun >/dev/null 2>&1 || ! command -v mpicc >/dev/null 2>&1 ||
  ! ldconfig -p 2>/dev/null | grep -q libclang; then
  sudo_=""
  [ "$(id -u)" -eq 0 ] || sudo_="sudo"
  $sudo_ apt-get update -qq
  $sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenmpi-dev openmpi-bin libclang-dev >/dev/null
fi
mpirun --version | head -1

echo "== cargo fmt --check"
cargo fmt --all --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The workspace build enables sere-core's `std` (the host asks for it); lint
# the default, allocation-free configuration on its own too.
cargo clippy -p sere-core -p sere-core-embedded-example --all-targets --locked -- -D warnings
# And with the optional ndarray wrappers (sere_core::nd, core/tests/nd.rs).
cargo clippy -p sere-core --all-targets --features ndarray --locked -- -D warnings
# And the host with data-parallel training over MPI.
cargo clippy -p sere-host --all-targets --features mpi --locked -- -D warnings

echo "== sere-core for thumbv7em-none-eabihf (no_std, no allocator)"
cargo build -p sere-core --target thumbv7em-none-eabihf --locked

echo "== a no_std, no-alloc consumer of sere-core (core/examples/embedded) as a thumbv7em-none-eabihf staticlib"
# A staticlib only compiles with its panic handler and without a global
# allocator if nothing in it or in sere-core allocates.
cargo rustc -p sere-core-embedded-example --lib --target thumbv7em-none-eabihf --locked --crate-type staticlib

echo "== NVRTC 13.0 and ptxas from PyPI (sere-cuda compiles and assembles its kernels; no GPU needed)"
# Exact versions: a newer NVRTC emits PTX the 580 driver rejects. pip skips
# the download when these versions are already installed.
nvidia_pins=(nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-nvcc==13.0.88)
python3 -m pip install --user --quiet --disable-pip-version-check --root-user-action=ignore "${nvidia_pins[@]}" ||
  python3 -m pip install --user --quiet --disable-pip-version-check --root-user-action=ignore --break-system-packages "${nvidia_pins[@]}"
cu13="$(python3 -c 'import site; print(site.getusersitepackages())')/nvidia/cu13"
# cudarc dlopens libnvrtc.so.13 by name: put the wheel's lib/ on the loader path.
export LD_LIBRARY_PATH="$cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export SERE_PTXAS="$cu13/bin/ptxas"
# In CI a missing NVRTC/ptxas fails cuda/tests/ptx.rs instead of skipping it.
export SERE_REQUIRE_NVRTC=1
echo "NVRTC: $cu13/lib/libnvrtc.so.13, ptxas: $SERE_PTXAS"

echo "== cargo test (the host with MPI: host/tests/mpi.rs starts 2 and 3 ranks with mpirun)"
# One build serves every test: the host with MPI still trains as one
# process when no launcher started it (the CLI tests).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cargo test --workspace --locked --features sere-host/mpi

echo "== sere-core and its no_std consumer without the std feature (allocation-free GEMM)"
cargo test -p sere-core -p sere-core-embedded-example --locked

echo "== sere-core's ndarray feature (sere_core::nd: every kernel on ndarray views)"
cargo test -p sere-core --features ndarray --locked
# ndarray without its std feature is no_std + alloc: the library still builds
# for the bare-metal target (a firmware using it needs a global allocator).
cargo build -p sere-core --target thumbv7em-none-eabihf --features ndarray --locked

echo "== sere-core's host example (core/examples/two_views.rs)"
cargo run -p sere-core --example two_views --locked
