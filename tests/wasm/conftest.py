"""Fixtures shared by the edge tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The engine artifact cache of one test module (never the user's): the first test compiles, the rest load."""
    return tmp_path_factory.mktemp("cache")
