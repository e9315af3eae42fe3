"""Moved to tests.kit.models. Only what tests/test_packaging.py (owned elsewhere right now) still imports from here;
it goes once that file imports tests.kit (write_mlp_dir is tests.kit.models.write_mlp)."""

from tests.kit.models import write_mlp as write_mlp_dir

__all__ = ["write_mlp_dir"]
