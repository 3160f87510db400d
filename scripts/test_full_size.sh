#!/usr/bin/env bash
# gemma-2-2b's full shape in the browser: a random Gemma-2 classifier of hidden 2304, 26 layers and the 256k
# vocabulary (make_bundle), in q4 and int8, scored natively by `trainer predict --weights W` and then streamed into
# headless Chromium's worker on WebGPU (SwiftShader here), which must give the same P(A) within 1e-3 and keep its
# peak wasm memory under 1.5 GB (web/browser-tests/large.test.mjs). Too long for CI next to the rest: CI runs the
# same test on 4 of the 26 layers.
#
#   bash scripts/test_full_size.sh                 # q4, then int8; records in target/browser/large-h2304-l26-*.json
#   WEIGHTS=q4 bash scripts/test_full_size.sh
#
# Needs about 6 GB of disk (bundles in target/test-bundles/) and 14 GB of memory (the CPU's widened native copy).
set -euo pipefail
cd "$(dirname "$0")/.."
WEIGHTS=${WEIGHTS:-"q4 int8"}

bash scripts/setup.sh --test
# The binaries `cargo test` builds (a `cargo build -p trainer` unifies features differently and rebuilds burn).
cargo test -q --workspace --exclude web --no-run
[ -f dist/index.html ] || trunk build --release

dir=target/test-bundles/h2304-l26
mkdir -p target/test-bundles
for w in $WEIGHTS; do
  if [ ! -f $dir/web/model.$w.safetensors ]; then
    # One pass writes every format asked for (the manifest lists what that pass wrote).
    echo "== making the bundle ($WEIGHTS): about a quarter of an hour"
    FORMATS=$(echo $WEIGHTS | tr ' ' ,) ./target/debug/examples/make_bundle $dir 2304 26 > $dir.json
    break
  fi
done
for w in $WEIGHTS; do
  echo "== $w: trainer predict, then the browser"
  # Scored again only when the bundle is newer than the scores (about 5 minutes, mostly loading).
  [ $dir-native-$w.csv -nt $dir/web/model.$w.safetensors ] ||
    ./target/debug/trainer predict --device cpu --model $dir/web --weights $w \
      --data web/browser-tests/short-pair.csv --out $dir-native-$w.csv
  # WebGPU only: the CPU fallback refuses 26 layers (large.test.mjs checks that refusal in CI).
  ARENA_LARGE_BUNDLE=$dir ARENA_LARGE_WEIGHTS=$w ARENA_LARGE_BACKENDS=webgpu node --test web/browser-tests/large.test.mjs
done
