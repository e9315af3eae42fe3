"""Moved to tests.kit (procs, s3, http_range, fault_proxy). Only what tests/test_packaging.py (owned elsewhere right
now) still imports from here; it goes once that file imports tests.kit."""

from tests.kit.procs import free_port, wait_until

__all__ = ["free_port", "wait_until"]
