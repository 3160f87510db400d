#!/usr/bin/env bash
# LoRA training throughput and peak memory: arena-judge (burn) against PyTorch + PEFT, same config, same
# weights, same machine, side by side (the recipe's adapters, batch 1 at SEQ tokens, AdamW each step).
#
#   bash bench/train_vs_peft.sh                      # 2-core CPU: mid-size config (hidden 512, 8 layers, 256k vocab)
#   PRESET=2b DEVICE=gpu bash bench/train_vs_peft.sh  # a GPU machine: gemma-2-2b-shaped random weights
#
# Writes bench/out/train.json and prints both figures and their ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${PRESET:-mid}
DEVICE=${DEVICE:-cpu}
SEQ=${SEQ:-512}
STEPS=${STEPS:-3}
if [ -z "${PY:-}" ]; then
  VENV=.cache/bench-venv
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, peft" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch "transformers==5.24.0" safetensors peft
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

# On a GPU both sides train in half precision (the recipe's fp16: PyTorch bf16 autocast-free weights, our f16
# base); on the CPU both in f32. PEAK_TFLOPS is the device's dense half-precision peak for MFU (H200: 989).
if [ "$DEVICE" = gpu ]; then torch_dev=cuda; burn_devs="wgpu"; tdtype=bfloat16; bprec=f16; else torch_dev=cpu; burn_devs="cpu"; tdtype=float32; bprec=f32; fi
py=$("$PY" bench/train_peft.py "$MODEL" "$torch_dev" "$SEQ" "$STEPS" "$tdtype" | tail -n 1)
echo "pytorch+peft ($torch_dev): $py"
results="{\"preset\": \"$PRESET\", \"pytorch\": $py"
for d in $burn_devs; do
  r=$("$TRAINER" bench train "$MODEL" "$d" "$SEQ" "$STEPS" "$bprec" 2>/dev/null | tail -n 1)
  echo "arena-judge ($d): $r"
  results="$results, \"burn_$d\": $r"
done
echo "$results}" > bench/out/train.json
MODEL="$MODEL" SEQ="$SEQ" DEVICE="$DEVICE" PEAK_TFLOPS="${PEAK_TFLOPS:-989}" "$PY" - <<'PYEOF'
import json, os
r = json.load(open("bench/out/train.json"))
# Model FLOPs per token as shared::model::flops counts them (the same model and adapters on both sides).
flops_per_token = next(v["flops_per_token"] for k, v in r.items() if k.startswith("burn_"))
base = r["pytorch"]["tokens_per_s"]
for k, v in r.items():
    if not k.startswith("burn_"):
        continue
    line = (f"{k}: {v['tokens_per_s']:.1f} tokens/s vs pytorch+peft {base:.1f} tokens/s = "
            f"{v['tokens_per_s'] / base:.2f}x, peak {v['peak_rss_mib']:.0f} MiB vs {r['pytorch']['peak_mib']:.0f} MiB")
    if os.environ["DEVICE"] == "gpu":
        peak = float(os.environ["PEAK_TFLOPS"]) * 1e12
        line += (f"; MFU {100 * v['tokens_per_s'] * flops_per_token / peak:.1f}% "
                 f"vs pytorch {100 * base * flops_per_token / peak:.1f}%")
    print(line)
PYEOF
