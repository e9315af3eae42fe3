#!/usr/bin/env bash
# Installs the local cloud-storage emulators the gs:// and az:// tests run against, and the CRD validators the
# deploy tests use (idempotent):
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

# npm packages, installed together into .ci/node (one `npm install`, so none removes another):
#   Azurite, the Azure Blob emulator; and the validators generated from the Prometheus operator's and KEDA's CRD
#   schemas (kubernetes-models), which tests/deploy uses for the PodMonitor and the ScaledObject.
NPM_PACKAGES=(
  "azurite@$AZURITE_VERSION"
  "@kubernetes-models/prometheus-operator@6.0.0"
  "@kubernetes-models/keda@2.0.0"
)
missing=()
for spec in "${NPM_PACKAGES[@]}"; do
  name=${spec%@*}
  want=${spec##*@}
  have=$(node -p "require('./.ci/node/node_modules/$name/package.json').version" 2>/dev/null || true)
  [ "$have" = "$want" ] || missing+=("$spec")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if ! command -v npm >/dev/null; then
    echo "install-emulators: npm not found; az:// emulator tests are skipped, CRD validation tests fail" >&2
    exit 0
  fi
  mkdir -p .ci/node
  npm install --prefix .ci/node --no-audit --no-fund --save-exact --loglevel=error "${NPM_PACKAGES[@]}" </dev/null
fi
