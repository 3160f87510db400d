#!/usr/bin/env bash
# The whole test suite: native tests of every crate, then the shared crate built for wasm32 and checked in Node
# against the same Python-recipe fixture. Installs what it needs first (scripts/setup.sh --test).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --test

echo "== native tests"
cargo test --workspace --exclude web --no-fail-fast

echo "== the demo bundle and its native predictions, for the wasm and browser checks"
# The trainer binary `cargo test` just built (a `cargo run -p trainer` may unify features differently and rebuild).
# The site ships runs/demo's bundle (index.html); a short demo makes one where there is none yet.
# A bundle from before q4 existed is remade.
[ -f runs/demo/export/web/model.q4.safetensors ] || ./target/debug/trainer demo --max-steps 4 > target/test-demo.log
mkdir -p target/test-demo
./target/debug/trainer predict --device cpu --model runs/demo/export/web \
  --data data/arena-sample.parquet --limit 12 --out target/test-demo/native-12.csv | tee target/test-demo/native-12.log
for weights in int8 q4; do
  ./target/debug/trainer predict --device cpu --model runs/demo/export/web --weights $weights \
    --data data/arena-sample.parquet --limit 1 --out target/test-demo/native-$weights-1.csv
done

echo "== third_party: each vendored crate is its crates.io release plus its one fix; SPIR-V: every kernel of f16"
echo "   training and q4 prediction on wgpu passes spirv-val"
bash scripts/check_vendored.sh
bash scripts/check_features.sh
bash scripts/check_spirv.sh

echo "== a gemma-2-2b-wide q4 bundle (hidden 2304, 256k vocabulary, 4 of its 26 layers) and its native prediction"
# bench/browser_max_bundle.sh runs the full 26 layers; that takes longer than CI has.
large=target/test-bundles/h2304-l4
mkdir -p target/test-bundles
[ -f $large/web/manifest.json ] || FORMATS=q4 ./target/debug/examples/make_bundle $large 2304 4 > $large.json
./target/debug/trainer predict --device cpu --model $large/web --weights q4 \
  --data web/browser-tests/short-pair.csv --out $large-native-q4.csv

echo "== wasm32: build and check against the recipe fixture and the native model in Node"
cargo build -p web --target wasm32-unknown-unknown --profile wasm-release
wasm-bindgen --target nodejs --out-dir target/web-node target/wasm32-unknown-unknown/wasm-release/web.wasm
node --test web/tests/*.mjs

echo "== the site: trunk build, then the app in headless Chromium (WebGPU on SwiftShader, and the CPU fallback)"
trunk build --release
node --test --test-concurrency=1 web/browser-tests/*.mjs
