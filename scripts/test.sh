#!/usr/bin/env bash
# The whole test suite: native tests of every crate, then the shared crate built for wasm32 and checked in Node
# against the same Python-recipe fixture. Installs what it needs first (scripts/setup.sh --test).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --test

echo "== native tests"
cargo test --workspace --exclude web

echo "== wasm32: build and check against the recipe fixture in Node"
cargo build -p web --target wasm32-unknown-unknown --release
wasm-bindgen --target nodejs --out-dir target/web-node target/wasm32-unknown-unknown/release/web.wasm
node --test web/tests/*.mjs
