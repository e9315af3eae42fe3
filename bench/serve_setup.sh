#!/usr/bin/env bash
# Virtual environments for the serving benchmark's baselines (bench/serve_bench.py): MLServer, the KServe Python
# model server and infinity-emb, each in its own venv because their pins (fastapi, starlette, pandas, protobuf, numpy,
# huggingface-hub) disagree.
#
#   bash bench/serve_setup.sh            # creates/updates bench/.venvs/{mlserver,kserve,infinity}; safe to re-run
#
# The venvs see the system site-packages, so torch 2.13.0+cpu, numpy, tokenizers and warmpod's own deps come from
# the system and are not downloaded again; what a venv installs itself shadows the system copy. Every install is
# constrained by constraints.txt (torch==2.13.0), and the script refuses a venv whose torch is not the system's.
set -euo pipefail

# What each venv gets, NAME==VERSION, the server first.
# MLServer 1.7.1's parallel workers crash at start with uvloop >= 0.22 ("There is no current event loop in thread
# 'MainThread'", SeldonIO/MLServer#2286; the fix, #2285, is unreleased): uvloop 0.21.0 is the last that works.
MLSERVER_REQUIREMENTS=(mlserver==1.7.1 uvloop==0.21.0)
KSERVE_REQUIREMENTS=(kserve==0.21.0)
# infinity-emb 0.0.78 (torch engine) wants sentence-transformers < 4 (so transformers < 5, so huggingface-hub < 1) and
# numpy < 2, older than the system's: pinned here, or pip backtracks through hundreds of huggingface-hub releases.
# Its torch extra only asks torch >= 2.2.1, so the system's 2.13.0 stays. No optimum: BetterTransformer (optimum < 2)
# is off anyway (--no-bettertransformer), as is torch.compile; its defaults otherwise.
INFINITY_REQUIREMENTS=(infinity-emb[server,torch]==0.0.78 sentence-transformers==3.4.1 transformers==4.57.6
    huggingface-hub==0.36.2 numpy==1.26.4)

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$BENCH_DIR")"
PYTHON="${PYTHON:-python3}"
CONSTRAINTS="$REPO/constraints.txt"
SYSTEM_TORCH="$("$PYTHON" -c 'import torch; print(torch.__version__)')"

setup_venv() {
    local name="$1"
    shift
    local venv="$BENCH_DIR/.venvs/$name" req installed missing=0
    if [[ ! -x "$venv/bin/python" ]]; then
        echo "creating $venv" >&2
        "$PYTHON" -m venv --system-site-packages "$venv"
    fi
    # Skip pip entirely when every pinned version is already there (the common re-run).
    for req in "$@"; do
        local dist="${req%%==*}"
        dist="${dist%%[*}" # infinity-emb[server,torch] -> infinity-emb
        installed="$("$venv/bin/python" -c "from importlib.metadata import version; print(version('$dist'))" \
            2>/dev/null || true)"
        [[ "$installed" == "${req#*==}" ]] || missing=1
    done
    if ((missing)); then
        echo "installing $* into $venv" >&2
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$CONSTRAINTS" "$@"
    fi
    local torch
    torch="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
    if [[ "$torch" != "$SYSTEM_TORCH" ]]; then
        echo "error: $venv has torch $torch, the system has $SYSTEM_TORCH; remove the venv and re-run" >&2
        exit 1
    fi
    echo "$name: $*, torch $torch ($venv)" >&2
}

setup_venv mlserver "${MLSERVER_REQUIREMENTS[@]}"
setup_venv kserve "${KSERVE_REQUIREMENTS[@]}"
setup_venv infinity "${INFINITY_REQUIREMENTS[@]}"
