#!/usr/bin/env bash
# Installs the local cloud-storage emulators the gs:// and az:// tests run against (idempotent):
#   gcp-storage-emulator (PyPI, pure Python) for Google Cloud Storage,
#   Azurite (npm) for Azure Blob, into .ci/node (tests look for .ci/node/node_modules/.bin/azurite-blob).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
GCS_EMULATOR_VERSION=2026.7.19
AZURITE_VERSION=3.37.0

installed_version() {
  "$PY" -c 'import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass' "$1"
}

if [ "$(installed_version gcp-storage-emulator)" != "$GCS_EMULATOR_VERSION" ]; then
  # -c constraints.txt: nothing here may move torch off its pinned CPU build.
  "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore -c constraints.txt "gcp-storage-emulator==$GCS_EMULATOR_VERSION"
fi

azurite_pkg=.ci/node/node_modules/azurite/package.json
have_azurite=$(node -p "require('./$azurite_pkg').version" 2>/dev/null || true)
if [ "$have_azurite" != "$AZURITE_VERSION" ]; then
  if ! command -v npm >/dev/null; then
    echo "install-emulators: npm not found; az:// emulator tests will be skipped" >&2
    exit 0
  fi
  mkdir -p .ci/node
  npm install --prefix .ci/node --no-audit --no-fund --save-exact --loglevel=error "azurite@$AZURITE_VERSION" </dev/null
fi
