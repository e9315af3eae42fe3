"""Moved to tests.kit.warmpod. Only what tests/test_packaging.py (owned elsewhere right now) still imports from here;
it goes once that file imports tests.kit."""

from tests.kit.warmpod import REPO

__all__ = ["REPO"]
