#!/usr/bin/env bash
# Checks that third_party/cubecl-spirv is crates.io's cubecl-spirv 0.11.3 with fix.patch applied and nothing else
# changed (see its PATCHED.md). Fetches the pristine package into cargo's cache through a throwaway crate.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
vendored=$root/third_party/cubecl-spirv
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

mkdir -p "$tmp/fetch/src" "$tmp/pristine"
: > "$tmp/fetch/src/lib.rs"
printf '[package]\nname = "fetch"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\ncubecl-spirv = "=0.11.3"\n' \
  > "$tmp/fetch/Cargo.toml"
(cd "$tmp/fetch" && cargo fetch --quiet)
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cubecl-spirv-0.11.3 | head -1)

# The pristine package with the patch applied must equal the vendored tree, apart from the files left out or added.
cp -r "$src/." "$tmp/pristine/"
rm -f "$tmp/pristine/.cargo-ok" "$tmp/pristine/.cargo_vcs_info.json" "$tmp/pristine/Cargo.lock" \
  "$tmp/pristine/Cargo.toml.orig"
(cd "$tmp/pristine" && git apply -p1 "$vendored/fix.patch")
if ! diff -r -x PATCHED.md -x fix.patch "$tmp/pristine" "$vendored"; then
  echo "third_party/cubecl-spirv differs from cubecl-spirv 0.11.3 + fix.patch (above)" >&2
  exit 1
fi
echo "third_party/cubecl-spirv = cubecl-spirv 0.11.3 + fix.patch"
