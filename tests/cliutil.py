"""Moved to tests.kit.warmpod. Kept only so that files still importing this name keep working while their owners
move them to tests.kit; nothing new imports it, and it goes once nothing does."""

from tests.kit.warmpod import (
    REPO,
    error_line,
    events,
    load_cmd,
    published_nothing,
    result_json,
    run_load,
    run_warmpod,
    warmpod_cmd,
)
from tests.kit.warmpod import child_env as cli_env

__all__ = ["REPO", "cli_env", "error_line", "events", "load_cmd", "published_nothing", "result_json", "run_load",
           "run_warmpod", "warmpod_cmd"]  # fmt: skip
