"""Running the real `warmpod` CLI in a subprocess, and looking at what it left in the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WARMPOD_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra or {})
    return env


def warmpod_cmd(*args: str | Path) -> list[str]:
    """The command line of `warmpod ARGS...` run from this checkout by this interpreter."""
    return [sys.executable, "-m", "warmpod", *map(str, args)]


def load_cmd(*args: str | Path) -> list[str]:
    return warmpod_cmd("load", *args)


def run_warmpod(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`warmpod ARGS...` to the end, stdin closed, output captured as text; `env` added to the test environment."""
    return subprocess.run(
        warmpod_cmd(*args),
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def run_load(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return run_warmpod("load", *args, env=env, timeout=timeout)


def result_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def events(stderr: str) -> list[dict[str, Any]]:
    """The JSON event lines the CLI logged (non-JSON lines, like the final error line, are skipped)."""
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def error_line(proc: subprocess.CompletedProcess[str], prog: str = "warmpod load") -> str:
    """The last `PROG: error: ...` line the CLI wrote to stderr (asserted to be there)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"{prog}: error:")]
    assert lines, f"exit {proc.returncode}, no {prog} error line in stderr:\n{proc.stderr}"
    return lines[-1]


def published_nothing(store: Path, model: str) -> bool:
    """True when the model has no `current` and no version, and staging holds no files."""
    mdir = store / model
    versions = mdir / "versions"
    staged = [p for p in (mdir / "staging").rglob("*") if p.is_file()] if (mdir / "staging").exists() else []
    return (
        not (mdir / "current").exists()
        and not (versions.exists() and any(versions.iterdir()))
        and not any(p.stat().st_size for p in staged)
    )
