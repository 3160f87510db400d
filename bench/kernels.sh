#!/usr/bin/env bash
# Kernel launches per LoRA training step on wgpu, counted by cubecl's own launch log, for this build and
# optionally a reference build side by side (REFERENCE=path/to/other/trainer), with the ratio.
#
# A GPU step's time is, to a first order, its kernels' memory passes plus a launch overhead each; the count is the
# part of "where the time goes" that an emulator (lavapipe) measures about as a GPU would, since it depends mostly
# on the build and the model's graph, little on the device. Each run trains the tiny preset with the recipe's step (batch 1,
# accumulation 8) and otherwise default settings (the default precision; the step's rows computed as micro-batches
# of up to 4096 padded tokens where the build does so); two runs of different lengths cancel the launches of
# setup, evaluation and test, so what is left is the steps'. TRAIN_ARGS adds flags to this build's runs only.
#
#   bash bench/kernels.sh                                   # target/debug/trainer
#   TRAINER=target/release/trainer REFERENCE=/tmp/trainer-before bash bench/kernels.sh
#   PRECISION=f32 STEPS="2 4" bash bench/kernels.sh
#   TRAIN_ARGS="--micro-batch-tokens 0" bash bench/kernels.sh   # one row per micro-batch, as the recipe computes it
set -euo pipefail
cd "$(dirname "$0")/.."
trainer=$(realpath "${TRAINER:-target/debug/trainer}")
reference=${REFERENCE:+$(realpath "$REFERENCE")}
precision=${PRECISION:-auto}
read -r short long <<< "${STEPS:-2 4}"
read -r -a train_args <<< "${TRAIN_ARGS:-}"
data=$(realpath data/arena-sample.parquet)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$trainer" prepare --data "$data" --sample-percent 10 --out "$tmp/prepared" > "$tmp/prepare.log"

# launches BINARY STEPS [FLAGS...]: runs the training in a directory whose cubecl.toml logs every kernel launch (cubecl reads
# its configuration from the working directory), and writes the launches and step computations to $tmp/count.
launches() {
  local dir="$tmp/run-$(basename "$1")-$2-$RANDOM"
  mkdir -p "$dir"
  printf '[profiling.logger]\nlevel = "minimal"\nfile = "%s/launches.log"\nappend = false\n' "$dir" > "$dir/cubecl.toml"
  (cd "$dir" && "$1" train --prepared "$tmp/prepared" --preset tiny --lora-first-layer 0 --max-steps "$2" \
    --eval-steps 1000 --precision "$precision" --device wgpu --out "$dir/run" "${@:3}" > "$dir/train.log" 2>&1) \
    || { cat "$dir/train.log" >&2; exit 1; }
  # Step computations: an f16 step whose scaled gradients overflowed is computed again at half the scale.
  local overflows
  overflows=$(grep -o '"overflows":[0-9]*' "$dir"/run/checkpoint-*/trainer_state.json | tail -1 | cut -d: -f2)
  echo "$(grep -c '^Executing' "$dir/launches.log") $(( $2 + ${overflows:-0} ))" > "$tmp/count"
  cp "$dir/launches.log" "$tmp/last.log"
  grep -o -m1 'precision: [a-z0-9]*' "$dir/train.log" > "$tmp/precision" || true
}

# per_step BINARY [FLAGS...]: writes the launches per step computation, and how many of them are fused kernels,
# to $tmp/per_step.
per_step() {
  local a b pa pb fused_a fused_b
  launches "$1" "$short" "${@:2}"; read -r a pa < "$tmp/count"; fused_a=$(grep -c 'Fuse' "$tmp/last.log" || true)
  launches "$1" "$long" "${@:2}"; read -r b pb < "$tmp/count"; fused_b=$(grep -c 'Fuse' "$tmp/last.log" || true)
  echo "$(( (b - a) / (pb - pa) )) $(( (fused_b - fused_a) / (pb - pa) ))" > "$tmp/per_step"
}

per_step "$trainer" "${train_args[@]}"; read -r ours ours_fused < "$tmp/per_step"
cp "$tmp/last.log" "$tmp/ours.log"
echo "kernel launches per training step computed (tiny preset, batch 1 x accumulation 8, $(cat "$tmp/precision"), wgpu)"
printf '  %-48s %8s  %s\n' "build" "launches" "of them fused"
printf '  %-48s %8d  %d\n' "$trainer${TRAIN_ARGS:+ $TRAIN_ARGS}" "$ours" "$ours_fused"
if [ -n "$reference" ]; then
  per_step "$reference"; read -r ref ref_fused < "$tmp/per_step"
  printf '  %-48s %8d  %d\n' "$reference" "$ref" "$ref_fused"
  awk -v a="$ours" -v b="$ref" 'BEGIN { printf "  this build launches %.2fx the reference'"'"'s kernels per step\n", a / b }'
fi
echo "most launched in this build's longer run:"
sed 's/^Executing //; s/ | DynamicScalar.*_/ ..._/' "$tmp/ours.log" | sort | uniq -c | sort -rn | head -8
