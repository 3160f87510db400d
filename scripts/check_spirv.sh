#!/usr/bin/env bash
# Validates, with spirv-val (SPIRV-Tools), every SPIR-V kernel that a short f16 LoRA training run and a q4
# prediction compile on wgpu. Native builds compile Vulkan kernels to SPIR-V; lavapipe crashed on invalid modules
# from cubecl-spirv (third_party/cubecl-spirv/PATCHED.md) and a driver may accept one lavapipe rejects, so the
# modules themselves are checked. Needs the trainer binary (TRAINER, default target/debug/trainer) and a web
# bundle (BUNDLE, default runs/demo/export/web, which scripts/test.sh makes).
set -euo pipefail
cd "$(dirname "$0")/.."
trainer=${TRAINER:-target/debug/trainer}
bundle=${BUNDLE:-runs/demo/export/web}
command -v spirv-val >/dev/null || { echo "check_spirv: spirv-val not found (apt install spirv-tools)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# cubecl writes each kernel it compiles to this file, as SPIR-V assembly between ```spirv fences.
export CUBECL_DEBUG_LOG=$tmp/kernels.log
"$trainer" prepare --data data/arena-sample.parquet --sample-percent 10 --out "$tmp/prepared" > "$tmp/prepare.log"
"$trainer" train --prepared "$tmp/prepared" --preset tiny --lora-first-layer 0 --max-steps 2 --eval-steps 2 \
  --device wgpu --out "$tmp/run" > "$tmp/train.log" 2>&1 || { cat "$tmp/train.log" >&2; exit 1; }
grep -q "precision: f16" "$tmp/train.log" || { echo "check_spirv: the run did not train in f16" >&2; exit 1; }
grep "^device:" "$tmp/train.log"
"$trainer" predict --device wgpu --model "$bundle" --weights q4 --data data/arena-sample.parquet --limit 2 \
  --out "$tmp/pred.csv" > "$tmp/predict.log" 2>&1 || { cat "$tmp/predict.log" >&2; exit 1; }

mkdir "$tmp/spv"
awk -v dir="$tmp/spv" '/^```spirv/ { n++; f = sprintf("%s/%04d.spvasm", dir, n); next }
  /^```/ { f = ""; next }
  f { print > f }' "$CUBECL_DEBUG_LOG"
total=0 bad=0
for asm in "$tmp"/spv/*.spvasm; do
  total=$((total + 1))
  if ! spirv-as --target-env vulkan1.3 "$asm" -o "${asm%.spvasm}.spv" 2> "$tmp/err" \
     || ! spirv-val --target-env vulkan1.3 "${asm%.spvasm}.spv" 2> "$tmp/err"; then
    bad=$((bad + 1))
    echo "invalid: $(grep -m1 OpEntryPoint "$asm")" >&2
    head -3 "$tmp/err" >&2
  fi
done
[ "$total" -gt 0 ] || { echo "check_spirv: no SPIR-V kernel was logged (is this a WGSL build?)" >&2; exit 1; }
[ "$bad" -eq 0 ] || { echo "check_spirv: $bad of $total kernels are invalid SPIR-V" >&2; exit 1; }
echo "check_spirv: all $total kernels of f16 training and q4 prediction are valid SPIR-V"
