#!/usr/bin/env bash
# Browser against native on the same bundle and machine: time to first prediction (load + warm-up) and per-pair
# latency of the site in headless Chromium (WebGPU, and the CPU fallback), beside `trainer predict` on the same
# bundle (wgpu and cpu). Needs dist/ (trunk build --release) and scripts/setup.sh --test.
#
#   bash bench/browser_vs_native.sh        # prints both sides and the ratios; writes bench/out/browser.json
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=${PAIRS:-5}
mkdir -p bench/out
cargo build -q --release -p trainer
python3 -m http.server -d dist 8765 >/dev/null 2>&1 &
server=$!
trap 'kill $server' EXIT
sleep 1

# Native: one pair (process start, bundle, model, first prediction), then 1 + PAIRS pairs; the difference over
# PAIRS is the per-pair latency. Rows are the sample's first rows, as the site's examples are.
native() {
  local device=$1 n=$2 start end
  start=$(date +%s.%N)
  ./target/release/trainer predict --device "$device" --dtype f32 --batch-size 1 --model dist/bundle \
    --data data/arena-sample.parquet --limit "$n" --out bench/out/browser-native.csv >/dev/null
  end=$(date +%s.%N)
  python3 -c "print($end - $start)"
}
results="{"
for pair in "webgpu wgpu" "cpu cpu"; do
  set -- $pair
  b=$(node bench/browser_latency.mjs http://127.0.0.1:8765/ "$1" "$PAIRS" | tail -n 1)
  one=$(native "$2" 1)
  many=$(native "$2" $((PAIRS + 1)))
  per=$(python3 -c "print(($many - $one) / $PAIRS)")
  echo "browser ($1): $b"
  echo "native ($2): first prediction ${one}s, per pair ${per}s"
  results="$results\"$1\": {\"browser\": $b, \"native\": {\"first_prediction_s\": $one, \"per_pair_s\": $per}},"
done
echo "${results%,}}" > bench/out/browser.json
python3 - <<'PYEOF'
import json
r = json.load(open("bench/out/browser.json"))
for k, v in r.items():
    b, n = v["browser"], v["native"]
    print(f"{k}: first prediction {b['first_prediction_s']:.2f}s vs native {n['first_prediction_s']:.2f}s "
          f"({b['first_prediction_s'] / n['first_prediction_s']:.2f}x); per pair {b['per_pair_s']:.3f}s vs "
          f"{n['per_pair_s']:.3f}s ({b['per_pair_s'] / n['per_pair_s']:.2f}x)")
PYEOF
