"""Running `warmpod edge compile` in a subprocess, the real MiniLM's files, and the engines' epoch ticker threads,
for the edge tests."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

from tests.kit import warmpod
from tests.kit.models import minilm_dir

MINILM = minilm_dir()


def run_edge(*args: str | Path, cache: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`warmpod edge ARGS...` with its artifact cache in `cache` (never the user's)."""
    return warmpod.run_warmpod("edge", *args, env={"WARMPOD_WASM_CACHE": str(cache)}, timeout=timeout)


def error_line(proc: subprocess.CompletedProcess[str], prog: str = "warmpod edge compile") -> str:
    """tests.kit.warmpod.error_line, for `warmpod edge compile` unless told."""
    return warmpod.error_line(proc, prog)


def epoch_threads() -> set[threading.Thread]:
    """The engines' epoch ticker threads alive now (one per compiled engine not yet closed)."""
    return {t for t in threading.enumerate() if t.name == "wasm-epoch"}
