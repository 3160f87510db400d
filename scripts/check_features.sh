#!/usr/bin/env bash
# The native build's CPU backend (burn's flex) keeps its own `rayon` and `simd` features. The workspace takes burn
# with `default-features = false`, which drops them unless `shared`'s `native` feature asks for them again: without
# them every CPU matmul runs on one core and element-wise operations are scalar loops (README, "Forward pass
# against PyTorch"). Nothing fails without them, it is only slower, so this check is what notices.
set -euo pipefail
cd "$(dirname "$0")/.."
features=$(cargo tree -q -p arena-judge-shared -e features -i burn-flex)
for f in rayon simd; do
  if ! grep -q "burn-flex feature \"$f\"" <<< "$features"; then
    echo "check_features: the native build's burn-flex lacks its \"$f\" feature (shared/Cargo.toml, feature native)" >&2
    exit 1
  fi
done
echo "check_features: burn-flex is built with rayon and simd"
