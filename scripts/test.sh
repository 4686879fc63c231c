#!/usr/bin/env bash
# The project's test command (README.md): installs what the tests need beyond
# cargo, then runs formatting, lints, the whole test suite and the no_std build.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== toolchain components"
rustup component add rustfmt clippy >/dev/null 2>&1 || true
# no_std proof: sere-core must build for a bare-metal Cortex-M4F target.
rustup target add thumbv7em-none-eabihf

echo "== cargo fmt --check"
cargo fmt --all --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== sere-core for thumbv7em-none-eabihf (no_std, no allocator)"
cargo build -p sere-core --target thumbv7em-none-eabihf --locked

echo "== cargo test"
cargo test --workspace --locked
