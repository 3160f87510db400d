#!/usr/bin/env bash
# How large a bundle the browser loads and runs: random Gemma-2 classifiers with the real 256k vocabulary and
# growing width and depth up to gemma-2-2b's (2304 x 26), written by make_bundle one tensor at a time, each opened
# in headless Chromium on WebGPU (SwiftShader here) with its q4 (or int8) weights, streamed in, and asked for one
# prediction. Each line reports the load time, the first prediction's time, the peak wasm memory and the GPU bytes.
#
#   bash bench/browser_max_bundle.sh                  # the default ladder; writes bench/out/max-bundle.json
#   SIZES="512x8 1024x8" bash bench/browser_max_bundle.sh
#
# Needs dist/ (trunk build --release), scripts/setup.sh --test and the make_bundle example `cargo test --workspace
# --exclude web` builds (its speed is not what is measured). Bundles go to bench/out/bundles/ (several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-"256x4 512x8 1024x8 1536x8 2304x4 2304x26"}
WEIGHTS=${WEIGHTS:-q4}
mkdir -p bench/out/bundles
cargo test -q --workspace --exclude web --no-run
# Served from the repository root: the site from dist/, bundles from bench/out/bundles/.
python3 -m http.server -d . 8766 >/dev/null 2>&1 &
server=$!
trap 'kill $server' EXIT
sleep 1
results="["
for size in $SIZES; do
  hidden=${size%x*} layers=${size#*x}
  dir=bench/out/bundles/h$hidden-l$layers-$WEIGHTS
  [ -f "$dir/web/model.$WEIGHTS.safetensors" ] || FORMATS=$WEIGHTS ./target/debug/examples/make_bundle "$dir" "$hidden" "$layers" > "$dir.json"
  mb=$(python3 -c "import json,sys; m=json.load(open('$dir/web/manifest.json')); print(round(sum(f['bytes'] for f in m['files'] if '$WEIGHTS' in f['file'])/1e6, 1))")
  r=$(node bench/browser_max_bundle.mjs http://127.0.0.1:8766/dist/ "../$dir/web/" "$WEIGHTS" | tail -n 1)
  echo "h$hidden x $layers layers, $WEIGHTS weights $mb MB: $r"
  results="$results{\"hidden\": $hidden, \"layers\": $layers, \"weights_mb\": $mb, \"model\": $(cat "$dir.json"), \"browser\": $r},"
done
echo "${results%,}]" > bench/out/max-bundle.json
