#!/usr/bin/env bash
# Checks that each crate in third_party/ is its crates.io release with its fix.patch applied and nothing else changed
# (see each one's PATCHED.md). Fetches the pristine packages into cargo's cache through a throwaway crate.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# name version: the crates vendored in third_party/<name>, each used through [patch.crates-io].
crates=("cubecl-spirv 0.11.3" "burn-autodiff 0.22.1")

mkdir -p "$tmp/fetch/src"
: > "$tmp/fetch/src/lib.rs"
{
  printf '[package]\nname = "fetch"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\n'
  for c in "${crates[@]}"; do read -r name version <<< "$c"; printf '%s = "=%s"\n' "$name" "$version"; done
} > "$tmp/fetch/Cargo.toml"
(cd "$tmp/fetch" && cargo fetch --quiet)

for c in "${crates[@]}"; do
  read -r name version <<< "$c"
  vendored=$root/third_party/$name
  src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"$name-$version" | head -1)
  # The pristine package with the patch applied must equal the vendored tree, apart from the files left out or added.
  pristine=$tmp/pristine-$name
  mkdir -p "$pristine"
  cp -r "$src/." "$pristine/"
  rm -f "$pristine/.cargo-ok" "$pristine/.cargo_vcs_info.json" "$pristine/Cargo.lock" "$pristine/Cargo.toml.orig"
  (cd "$pristine" && git apply -p1 "$vendored/fix.patch")
  if ! diff -r -x PATCHED.md -x fix.patch "$pristine" "$vendored"; then
    echo "third_party/$name differs from $name $version + fix.patch (above)" >&2
    exit 1
  fi
  echo "third_party/$name = $name $version + fix.patch"
done
