#!/usr/bin/env bash
# Packs what bench/gpu.sh needs on a GPU machine that has no Rust toolchain and no network, in two folders, one
# per call of the device tool, since what travels with a call (the working tree with what it carries) is limited
# to 64 MiB:
#   bench/out/gpu           the stripped release `trainer` (it runs the benchmarks too: `trainer bench`),
#                           compressed with xz, the Vulkan loader packages that machine lacks, the Gemma tokenizer;
#   bench/out/gpu-autotune  the same `trainer` built with burn's autotuning (the `autotune` feature) and the loader
#                           packages, for `PART=autotune bash bench/gpu.sh`.
# It checks each call's size (the tree's tracked and untracked files at their full, apparent size, which is what
# a copy sends, plus the folder) and fails if one is over the limit.
#
#   bash bench/gpu_pack.sh        # writes both folders (ignored by git)
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=bench/out/gpu
AUTO=bench/out/gpu-autotune
LIMIT=$((64 * 1024 * 1024))
rm -rf "$PACK" "$AUTO" && mkdir -p "$PACK/bin" "$AUTO/bin"

# xz -9e with a dictionary as large as the binary: one ~85 MB binary compresses to about 13 MiB.
pack() { tar -C "$1" -cf - bin | xz -9e --lzma2=preset=9,dict=128MiB -T1 > "$1/bin.tar.xz"; rm -rf "$1/bin"; }

# Native builds compile Vulkan kernels to SPIR-V (tensor cores) on the GPU machine's Vulkan driver; see shared/Cargo.toml.
cargo build --release -p trainer --bin trainer
strip -o "$PACK/bin/trainer" target/release/trainer
pack "$PACK"
# Again with burn's autotuning, for gpu.sh to run side by side (the same target directory: only the crates whose
# features differ are built again).
cargo build --release -p trainer --bin trainer --features autotune
strip -o "$AUTO/bin/trainer_autotune" target/release/trainer
pack "$AUTO"

# wgpu needs the Vulkan loader (libvulkan1); the GL/EGL loaders let the NVIDIA driver's ICD load. amd64 packages
# whatever this machine is.
apt_opts=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64-lists)
mkdir -p /tmp/amd64-lists/partial "$PACK/debs"
apt-get "${apt_opts[@]}" update -qq
(cd "$PACK/debs" && apt-get "${apt_opts[@]}" download -qq libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
cp -r "$PACK/debs" "$AUTO/debs"

[ -f .cache/tokenizer-gemma/tokenizer.json ] || bash scripts/setup.sh
xz -9 -T1 -c .cache/tokenizer-gemma/tokenizer.json > "$PACK/tokenizer.json.xz"

# What each call sends: tracked and untracked, not ignored files, at their apparent size (a sparse test fixture
# takes 4 MB of disk for its 32 MiB), and the carried folder.
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | du -cb --files0-from=- | tail -n 1 | cut -f1)
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
status=0
for p in "$PACK" "$AUTO"; do
  size=$(du -sb "$p" | cut -f1)
  echo "$p: $(mib "$size"), with the tree's $(mib "$tree"): $(mib $((tree + size))) of the 64 MiB a call carries"
  if [ $((tree + size)) -gt "$LIMIT" ]; then echo "gpu_pack.sh: $p does not fit one call" >&2; status=1; fi
done
echo "on the GPU machine: carry bench/out/gpu and run 'bash bench/gpu.sh'; then, in a second call, carry"
echo "bench/out/gpu-autotune and run 'PART=autotune bash bench/gpu.sh'"
exit $status
