"""The floors of the package, read from the import statements: nothing imports upward, the store sits at the bottom,
and the server and the edge take nothing from the loader but the store."""

from __future__ import annotations

import ast

import pytest

from tests.kit.warmpod import REPO

pytestmark = pytest.mark.unit


def imports(folder: str) -> dict[str, set[str]]:
    """Each module file under `folder` (repository-relative) → the warmpod modules it imports (lazily too)."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
        found[str(path.relative_to(REPO))] = {n for n in names if n.split(".")[0] == "warmpod"}
    return found


def offenders(folder: str, allowed: tuple[str, ...]) -> dict[str, set[str]]:
    bad = {f: {m for m in ms if not m.startswith(allowed)} for f, ms in imports(folder).items()}
    return {f: ms for f, ms in bad.items() if ms}


def test_the_store_and_the_error_root_import_nothing_above_them() -> None:
    bottom = {"warmpod/store.py", "warmpod/safetensors_header.py", "warmpod/errors.py", "warmpod/cliargs.py"}
    for file, modules in imports("warmpod").items():
        if file in bottom:
            assert modules <= {"warmpod.errors", "warmpod.store"}, (file, modules)


def test_server_and_edge_import_nothing_of_the_loader() -> None:
    for folder in ("server", "wasm"):
        bad = {f: {m for m in ms if m.startswith("warmpod.loader")} for f, ms in imports(folder).items()}
        assert {f: ms for f, ms in bad.items() if ms} == {}


def test_the_loader_imports_only_the_store_and_the_shared_floor() -> None:
    allowed = ("warmpod.loader", "warmpod.store", "warmpod.safetensors_header", "warmpod.errors", "warmpod.cliargs")
    bad = {f: {m for m in ms if m != "warmpod" and not m.startswith(allowed)} for f, ms in imports("loader").items()}
    assert {f: ms for f, ms in bad.items() if ms} == {}


def test_the_edge_uses_the_server_only_through_its_public_pieces() -> None:
    """The edge plugs into the serving app as a ModelSource: it imports no server internals (app state, tasks)."""
    internals = ("warmpod.server.app", "warmpod.server.batcher")
    for file, modules in imports("wasm").items():
        used = {m for m in modules if m.startswith(internals)}
        assert used <= {"warmpod.server.app"}, (file, used)
        if used:  # the config type only
            text = (REPO / file).read_text()
            assert "from warmpod.server.app import ServerConfig\n" in text, file


def test_the_policy_is_pure() -> None:
    assert imports("warmpod/pods")["warmpod/pods/policy.py"] <= {"warmpod.errors"}
