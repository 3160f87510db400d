#!/usr/bin/env bash
# Where a wgpu run's device time goes, kernel by kind of kernel: runs COMMAND with cubecl's profiling logger, which
# times every kernel it launches (with the GPU's own timestamps where the adapter has them, else by waiting for
# each kernel), and prints the time and launches of each kind (matmul, fused element-wise, reduction, copy, ...)
# with its share, the kernels that took longest, and a JSON summary as the last line.
#
# The issue this answers: which means (fused attention, fused norms, fewer launches, faster matmuls) would buy
# the most on a GPU. Set STEPS to the number of timed steps that end COMMAND's run (the benchmarks: their STEPS
# or ITERS argument) and it reports those steps alone, found as the run's last STEPS equal runs of launches
# (a warm-up launches more), with the device time per step, which bench/gpu.sh sets against the same benchmark's
# step time unprofiled: what is left is time the GPU waited for the host. Timing every kernel serialises them,
# so a profiled run's own wall time says nothing; its kernels' durations do. On lavapipe the split says where an
# emulator's time goes, not a GPU's: run it there to check the script, on a GPU to read it.
#
#   bash bench/profile.sh target/debug/trainer train --preset tiny --lora-first-layer 0 --max-steps 2 \
#     --eval-steps 1000 --data data/arena-sample.parquet --device wgpu --out /tmp/prof-run   # the whole run
#   STEPS=3 bash bench/profile.sh target/debug/trainer bench train DIR wgpu 512 3 f16 1   # DIR: an HF model
#
# COMMAND runs in a scratch directory (cubecl reads its configuration from the working directory): paths in it
# (words with a '/') may be relative to the repository root, they are made absolute. The log stays in
# $PROFILE_DIR if set.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n '2,21p' "$0" >&2; exit 2; }
dir=${PROFILE_DIR:-$(mktemp -d)}
mkdir -p "$dir"
[ -n "${PROFILE_DIR:-}" ] || trap 'rm -rf "$dir"' EXIT
# Arguments that look like paths (they hold a '/') and exist, or whose folder exists (an --out to be made), are
# made absolute; bare words (`bench`, `train`, `wgpu`) are left alone even where a file of that name exists here.
args=()
for a in "$@"; do
  if [[ $a == */* && $a != /* && ( -e $a || -d $(dirname "$a") ) ]]; then args+=("$(realpath -m "$a")"); else args+=("$a"); fi
done
printf '[profiling.logger]\nlevel = "basic"\nfile = "%s/profile.log"\nappend = false\n' "$dir" > "$dir/cubecl.toml"
(cd "$dir" && "${args[@]}" > "$dir/command.out" 2> "$dir/command.err") || {
  rc=$?; echo "profile.sh: the command failed (exit $rc):" >&2; tail -n 20 "$dir/command.err" >&2; exit "$rc"
}
[ -s "$dir/profile.log" ] || { echo "profile.sh: cubecl logged no kernel (is it a wgpu run?)" >&2; exit 1; }
PROFILE_LOG="$dir/profile.log" STEPS="${STEPS:-}" WARMUP="${WARMUP:-}" python3 bench/profile_summary.py
