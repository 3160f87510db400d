#!/usr/bin/env bash
# Benchmark: `trainer prepare` against the reference recipe's Python preprocessing (pandas apply of smart
# truncation with transformers' fast Gemma tokenizer, then batch tokenization), side by side on the same machine,
# on the bundled sample rows replicated to the size of the WSDM train set (48,439 rows).
#
#   bash bench/prepare_vs_python.sh            # prints both wall times and the ratio; writes bench/out/prepare.json
#
# Python is timed inside the process from reading the parquet to the last input ids (interpreter start, imports
# and tokenizer loading excluded). trainer is timed as the whole command (process start, tokenizer loading, source
# hashing and cache writing included), median of 3 runs, with and without its chunk cache.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh >/dev/null
VENV=.cache/bench-venv
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "transformers==5.24.0" "tokenizers==0.23.3" "pandas==3.1.1" "pyarrow==26.0.1"
fi
PY="$VENV/bin/python"
DATA=bench/out/arena-48439.parquet
mkdir -p bench/out
[ -f "$DATA" ] || "$PY" bench/make_replicated.py data/arena-sample.parquet "$DATA" 48439
cargo build -q --release -p trainer

echo "python recipe preprocessing ($DATA) ..."
py_json=$("$PY" scripts/recipe_preprocess.py .cache/tokenizer-gemma "$DATA" 2>/dev/null | tail -n 1)

time_trainer() {
  local runs=()
  for _ in 1 2 3; do
    local t0 t1
    t0=$(date +%s.%N)
    ./target/release/trainer prepare --data "$DATA" --out bench/out/prepared --force "$@" >/dev/null
    t1=$(date +%s.%N)
    runs+=("$(python3 -c "print($t1 - $t0)")")
  done
  printf '%s\n' "${runs[@]}" | sort -n | sed -n 2p
}
echo "trainer prepare ..."
rust_s=$(time_trainer)
rust_nocache_s=$(time_trainer --token-cache-chunks 0)

"$PY" - "$py_json" "$rust_s" "$rust_nocache_s" "$(nproc)" <<'PYEOF'
import json, sys
py = json.loads(sys.argv[1]); rust, nocache, cores = float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
report = {"rows": py["rows"], "cores": cores, "python_recipe_s": round(py["seconds"], 2),
          "trainer_prepare_s": round(rust, 2), "trainer_prepare_no_cache_s": round(nocache, 2),
          "speedup": round(py["seconds"] / rust, 1), "speedup_no_cache": round(py["seconds"] / nocache, 1)}
print(f"rows {py['rows']}, {cores} cores")
print(f"  python recipe (pandas + transformers fast tokenizer) {py['seconds']:8.2f} s   1.0x")
print(f"  trainer prepare                                      {rust:8.2f} s   {py['seconds'] / rust:.1f}x")
print(f"  trainer prepare --token-cache-chunks 0               {nocache:8.2f} s   {py['seconds'] / nocache:.1f}x")
json.dump(report, open("bench/out/prepare.json", "w"), indent=2)
PYEOF
