#!/usr/bin/env bash
# The whole test suite: native tests of every crate, then the shared crate built for wasm32 and checked in Node
# against the same Python-recipe fixture. Installs what it needs first (scripts/setup.sh --test).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --test

echo "== native tests"
cargo test --workspace --exclude web --no-fail-fast

echo "== a demo bundle (trainer demo, 4 steps) and its native predictions, for the wasm model checks"
# The trainer binary `cargo test` just built (a `cargo run -p trainer` may unify features differently and rebuild).
./target/debug/trainer demo --out target/test-demo --max-steps 4 > target/test-demo.log
./target/debug/trainer predict --device cpu --model target/test-demo/export/web \
  --data data/arena-sample.parquet --limit 12 --out target/test-demo/native-12.csv

echo "== wasm32: build and check against the recipe fixture and the native model in Node"
cargo build -p web --target wasm32-unknown-unknown --release
wasm-bindgen --target nodejs --out-dir target/web-node target/wasm32-unknown-unknown/release/web.wasm
node --test web/tests/*.mjs
