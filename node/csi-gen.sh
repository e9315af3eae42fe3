#!/usr/bin/env bash
# Generate the Python of node/csi.proto: csi_pb2.py (messages), csi_pb2.pyi (their types, for mypy) and
# csi_pb2_grpc.py (stubs and servicers), all committed.
#   node/csi-gen.sh [OUT_DIR]    OUT_DIR defaults to node/ (the committed files)
# Needs grpcio-tools (the dev extra pins the version the committed files were made with: another version writes its
# own version numbers into them). The proto is compiled as warmpod/node/csi.proto, so the generated modules import
# each other as `warmpod.node.csi_pb2`, and the descriptor pool knows the file by a name no other package uses.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here}
case "$out" in /*) ;; *) out=$PWD/$out ;; esac
PY=${PYTHON:-python3}
TOOLS_VERSION=1.85.1

version=$("$PY" -c 'import importlib.metadata as m; print(m.version("grpcio-tools"))')
[ "$version" = "$TOOLS_VERSION" ] ||
  echo "csi-gen.sh: warning: grpcio-tools is $version; the committed files are made by $TOOLS_VERSION" >&2

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/warmpod/node"
cp "$here/csi.proto" "$tmp/warmpod/node/csi.proto"
(cd "$tmp" && "$PY" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. warmpod/node/csi.proto)

mkdir -p "$out"
for name in csi_pb2.py csi_pb2.pyi csi_pb2_grpc.py; do
  cp "$tmp/warmpod/node/$name" "$out/$name"
done
echo "generated csi_pb2.py, csi_pb2.pyi, csi_pb2_grpc.py in $out (grpcio-tools $version)"
