#!/usr/bin/env bash
# CI: the committed engine module is exactly what wasm/engine/build.sh makes from the committed sources.
#   .ci/check-wasm.sh [COMMITTED]    COMMITTED defaults to wasm/engine/warmpod_engine.wasm
# Installs the toolchain (Debian 12 packages) when it is missing; CI runs as root on a fresh machine.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
committed=${1:-$root/wasm/engine/warmpod_engine.wasm}

have_toolchain() {
  command -v clang >/dev/null && command -v wasm-ld >/dev/null && [ -e /usr/lib/wasm32-wasi/libc.a ] &&
    [ -e "$(clang --target=wasm32-wasi -print-libgcc-file-name)" ]
}
if ! have_toolchain; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang lld wasi-libc libclang-rt-14-dev-wasm32 >/dev/null
fi

fresh=$(mktemp --suffix=.wasm)
trap 'rm -f "$fresh"' EXIT
"$root/wasm/engine/build.sh" "$fresh" >/dev/null
if ! cmp -s "$fresh" "$committed"; then
  echo "check-wasm: $committed is not what the engine sources build (fresh build sha256" \
    "$(sha256sum "$fresh" | cut -c1-16)…, committed $( (sha256sum "$committed" 2>/dev/null || echo missing) | cut -c1-16)…):" \
    "run wasm/engine/build.sh and commit wasm/engine/warmpod_engine.wasm" >&2
  exit 1
fi
echo "check-wasm: $committed matches a fresh build"
