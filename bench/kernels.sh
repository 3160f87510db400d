#!/usr/bin/env bash
# Kernel launches per LoRA training step on wgpu, counted by cubecl's own launch log, for this build and
# optionally a reference build side by side (REFERENCE=path/to/other/trainer), with the ratio.
#
# A GPU step's time is, to a first order, its kernels' memory passes plus a launch overhead each; the count is the
# part of "where the time goes" that an emulator (lavapipe) measures about as a GPU would, since it depends mostly
# on the build and the model's graph, little on the device. Each run trains the tiny preset with the recipe's step (batch 1,
# accumulation 8) and otherwise default settings (the default precision; the step's rows computed as micro-batches
# of up to 4096 padded tokens where the build does so); the launches are cut into steps (see per_step) and the
# last whole step is reported, with its most launched kernels. TRAIN_ARGS adds flags to this build's runs only.
#
#   bash bench/kernels.sh                                   # target/debug/trainer
#   TRAINER=target/release/trainer REFERENCE=/tmp/trainer-before bash bench/kernels.sh
#   PRECISION=f32 STEPS="2 8" bash bench/kernels.sh
#   TRAIN_ARGS="--micro-batch-tokens 0" bash bench/kernels.sh   # one row per micro-batch, as the recipe computes it
set -euo pipefail
cd "$(dirname "$0")/.."
trainer=$(realpath "${TRAINER:-target/debug/trainer}")
reference=${REFERENCE:+$(realpath "$REFERENCE")}
precision=${PRECISION:-auto}
read -r short long <<< "${STEPS:-2 6}"
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
  overflows=$(grep -o '"overflows": *[0-9]*' "$dir"/run/checkpoint-*/trainer_state.json | tail -1 | tr -dc 0-9 || true)
  echo "$(grep -c '^Executing' "$dir/launches.log") $(( $2 + ${overflows:-0} ))" > "$tmp/count"
  cp "$dir/launches.log" "$tmp/last.log"
  grep -o -m1 'precision: [a-z0-9]*' "$dir/train.log" > "$tmp/precision" || true
}

# per_step BINARY [FLAGS...]: writes the launches per step computation, and how many of them are fused kernels,
# to $tmp/per_step, and the launches of each kernel in one such step to $tmp/kinds.
#
# Every step computation starts with the dropout draws of its first forward pass (a Bernoulli kernel per adapter
# and micro-batch): the longer run's launches are cut there into steps, and the last whole step is taken. The two runs
# of different lengths give how many draws a step makes. A plain difference of the two runs' totals is not enough:
# how burn's fusion splits the evaluation and test passes into kernels varies from run to run (by hundreds of
# launches), while a step's launches settle after its first few steps and then repeat exactly.
per_step() {
  local pa pb draws_a draws_b k
  launches "$1" "$short" "${@:2}"; read -r _ pa < "$tmp/count"; draws_a=$(grep -c 'Bernoulli' "$tmp/last.log" || true)
  launches "$1" "$long" "${@:2}"; read -r _ pb < "$tmp/count"; draws_b=$(grep -c 'Bernoulli' "$tmp/last.log" || true)
  k=$(( (draws_b - draws_a) / (pb - pa) ))
  if [ "$k" -le 0 ]; then
    echo "kernels.sh: no dropout draws to find the steps by (train with dropout > 0)" >&2
    exit 1
  fi
  # One line per step computation: its launches, its fused launches, and its kernels, tab-separated.
  sed 's/^Executing //; s/ | DynamicScalar.*_/ ..._/' "$tmp/last.log" | awk -v k="$k" '
    /Bernoulli/ { if (draws % k == 0 && n) { print n, fused, kinds; n = 0; fused = 0; kinds = "" } draws++ }
    draws { n++; if (/Fuse/) fused++; kinds = kinds "\t" $0 }
  ' > "$tmp/steps"
  # The last line also holds the evaluation and test passes: leave it out.
  sed -i '$d' "$tmp/steps"
  # The steps' launches settle after the first few (fusion explores, the loss scale finds its level) and then
  # repeat exactly: report the last whole step.
  local settled
  settled=$(tail -1 "$tmp/steps")
  echo "$settled" | cut -f1 | awk '{ print $1, $2 }' > "$tmp/per_step"
  echo "$settled" | cut -f2- | tr '\t' '\n' | sort | uniq -c | sort -rn > "$tmp/kinds"
}

per_step "$trainer" "${train_args[@]}"; read -r ours ours_fused < "$tmp/per_step"
cp "$tmp/kinds" "$tmp/ours_kinds"
echo "kernel launches per training step computed (tiny preset, batch 1 x accumulation 8, $(cat "$tmp/precision"), wgpu)"
printf '  %-48s %8s  %s\n' "build" "launches" "of them fused"
printf '  %-48s %8d  %d\n' "$trainer${TRAIN_ARGS:+ $TRAIN_ARGS}" "$ours" "$ours_fused"
if [ -n "$reference" ]; then
  per_step "$reference"; read -r ref ref_fused < "$tmp/per_step"
  printf '  %-48s %8d  %d\n' "$reference" "$ref" "$ref_fused"
  awk -v a="$ours" -v b="$ref" 'BEGIN { printf "  this build launches %.2fx the reference'"'"'s kernels per step\n", a / b }'
fi
echo "most launched in this build's last whole step:"
head -"${TOP:-8}" "$tmp/ours_kinds"
