#!/usr/bin/env bash
# Packs what bench/gpu.sh needs on a GPU machine that has no Rust toolchain and no network: stripped release
# binaries (trainer, bench_forward, bench_train, and the two benchmarks built with burn's autotuning) compressed
# together with xz, which shares their common code, the Vulkan loader packages that machine lacks, and the Gemma
# tokenizer.
#
#   bash bench/gpu_pack.sh        # writes bench/out/gpu/ (ignored by git): carry that folder to the GPU machine
#
# The sources and data/ travel with the working tree; bench/out/gpu must keep everything under 64 MiB with them.
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=bench/out/gpu
rm -rf "$PACK" && mkdir -p "$PACK/bin" "$PACK/debs"

# Native builds compile Vulkan kernels to SPIR-V (tensor cores) on the GPU machine's Vulkan driver; see shared/Cargo.toml.
cargo build --release -p trainer --bin trainer --example bench_forward --example bench_train
for b in target/release/trainer target/release/examples/bench_forward target/release/examples/bench_train; do
  strip -o "$PACK/bin/$(basename "$b")" "$b"
done
# The two benchmarks again with burn's autotuning (the `autotune` feature), for gpu.sh to run side by side. Same
# target directory: only the crates whose features differ are built twice, and xz stores mostly their differences.
cargo build --release -p trainer --features autotune --example bench_forward --example bench_train
for b in bench_forward bench_train; do
  strip -o "$PACK/bin/${b}_autotune" "target/release/examples/$b"
done
tar -C "$PACK" -cf - bin | xz -9e --lzma2=preset=9,dict=192MiB -T1 > "$PACK/bin.tar.xz"
rm -rf "$PACK/bin"

# wgpu needs the Vulkan loader (libvulkan1); the GL/EGL loaders let the NVIDIA driver's ICD load. amd64 packages
# whatever this machine is.
apt_opts=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64-lists)
mkdir -p /tmp/amd64-lists/partial
apt-get "${apt_opts[@]}" update -qq
(cd "$PACK/debs" && apt-get "${apt_opts[@]}" download -qq libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)

[ -f .cache/tokenizer-gemma/tokenizer.json ] || bash scripts/setup.sh
xz -9 -T1 -c .cache/tokenizer-gemma/tokenizer.json > "$PACK/tokenizer.json.xz"

du -sh "$PACK"
echo "tree that travels: $(git ls-files -z | du -ch --files0-from=- | tail -n 1 | cut -f1) + $(du -sh "$PACK" | cut -f1)"
echo "on the GPU machine, with bench/out/gpu carried: bash bench/gpu.sh"
