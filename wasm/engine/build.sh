#!/usr/bin/env bash
# Build the edge engine: wasm/engine/*.c → a wasm32 reactor that imports nothing (see wasm/ABI.md).
#   wasm/engine/build.sh [OUT]    OUT defaults to wasm/engine/warmpod_engine.wasm (the committed module)
# Needs Debian 12's clang 14, lld, wasi-libc and libclang-rt-14-dev-wasm32 (another clang or wasi-libc builds a
# working engine with other bytes). The output is byte-for-byte reproducible wherever the checkout is: no debug
# info, no names, no paths (the sources are compiled from their own directory, under a prefix map), no timestamps.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/warmpod_engine.wasm}
case "$out" in /*) ;; *) out=$PWD/$out ;; esac
CLANG=${CLANG:-clang}

version=$("$CLANG" -dumpversion)
[ "$version" = 14.0.6 ] || echo "build.sh: warning: $CLANG is $version; the committed module is built by Debian 12's clang 14.0.6" >&2

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$here"
"$CLANG" --target=wasm32-wasi -O3 -msimd128 -mexec-model=reactor -std=c11 -DNDEBUG \
  -Wall -Wextra -Werror -Wno-unused-parameter \
  -ffile-prefix-map="$here"=. -fdebug-prefix-map="$here"=. -g0 -fno-ident \
  -Wl,--strip-all -Wl,--no-export-dynamic \
  -o "$tmp/engine.wasm" engine.c kernels.c -lm

# The contract: no imports, and exactly the ABI's functions plus memory and _initialize.
python3 - "$tmp/engine.wasm" wp_abi_version wp_alloc wp_free wp_error wp_init wp_set_tensor wp_ready wp_run <<'CHECK'
import sys

def leb(data, i):
    value = shift = 0
    while True:
        byte = data[i]
        value, shift, i = value | (byte & 0x7F) << shift, shift + 7, i + 1
        if byte < 0x80:
            return value, i

path, expected = sys.argv[1], {*sys.argv[2:], "memory", "_initialize"}
data = open(path, "rb").read()
i, imports, exports = 8, 0, set()
while i < len(data):
    section = data[i]
    size, body = leb(data, i + 1)
    if section == 2:  # imports: count first
        imports, _ = leb(data, body)
    elif section == 7:  # exports: count, then (name length, name, kind byte, index) each
        count, j = leb(data, body)
        for _ in range(count):
            n, j = leb(data, j)
            exports.add(data[j : j + n].decode())
            _, j = leb(data, j + n + 1)
    i = body + size
if imports:
    sys.exit(f"build.sh: the module imports {imports} things; the engine must import nothing (no WASI, no host calls)")
if exports != expected:
    sys.exit(f"build.sh: the module exports {sorted(exports)}, not the ABI's {sorted(expected)}")
CHECK

mkdir -p "$(dirname "$out")"
cp "$tmp/engine.wasm" "$out"
echo "built $out ($(wc -c <"$out") bytes, sha256 $(sha256sum "$out" | cut -c1-16)…)"
