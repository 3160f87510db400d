#!/usr/bin/env bash
# Forward throughput and peak memory of the Gemma-2 classifier: arena-judge (burn) against PyTorch transformers,
# same config, same weights, same machine, side by side.
#
#   bash bench/forward_vs_pytorch.sh               # 2-core CPU: mid-size config (hidden 512, 8 layers, 256k vocab)
#   PRESET=2b DEVICE=gpu bash bench/forward_vs_pytorch.sh   # a GPU machine: gemma-2-2b-shaped random weights
#
# Writes bench/out/forward.json and prints both figures and their ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${PRESET:-mid}
DEVICE=${DEVICE:-cpu}
BATCH=${BATCH:-4}
SEQ=${SEQ:-512}
ITERS=${ITERS:-3}
# PY may name a Python that already has torch and transformers; else a venv is made under .cache/.
if [ -z "${PY:-}" ]; then
  VENV=.cache/bench-venv
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch "transformers==5.24.0" safetensors
  fi
  PY="$VENV/bin/python"
fi
MODEL="bench/out/gemma2-$PRESET"
[ -f "$MODEL/config.json" ] || "$PY" bench/forward_vs_pytorch.py make "$MODEL" --preset "$PRESET"
# TRAINER may name a trainer binary already built (say target/debug/trainer, whose dependencies, burn among
# them, are optimised too: see the workspace's profiles); else the release build is made and used.
if [ -z "${TRAINER:-}" ]; then
  cargo build -q --release -p trainer --bin trainer
  TRAINER=./target/release/trainer
fi

if [ "$DEVICE" = gpu ]; then torch_dev=cuda; burn_devs="wgpu"; else torch_dev=cpu; burn_devs="cpu wgpu"; fi
py=$("$PY" bench/forward_vs_pytorch.py run "$MODEL" "$torch_dev" "$BATCH" "$SEQ" "$ITERS" | tail -n 1)
echo "pytorch ($torch_dev): $py"
results="{\"preset\": \"$PRESET\", \"pytorch\": $py"
for d in $burn_devs; do
  r=$("$TRAINER" bench forward "$MODEL" "$d" "$BATCH" "$SEQ" "$ITERS" 2>/dev/null | tail -n 1)
  echo "arena-judge ($d): $r"
  results="$results, \"burn_$d\": $r"
done
echo "$results}" > bench/out/forward.json
"$PY" - <<'PYEOF'
import json
r = json.load(open("bench/out/forward.json"))
base = r["pytorch"]["rows_per_s"]
for k, v in r.items():
    if k.startswith("burn_"):
        print(f"{k}: {v['rows_per_s']:.2f} rows/s vs pytorch {base:.2f} rows/s = {v['rows_per_s'] / base:.2f}x, "
              f"peak {v['peak_rss_mib']:.0f} MiB vs {r['pytorch']['peak_mib']:.0f} MiB")
PYEOF
