"""`warmpod store ls ROOT [--json]` on the stores that exist: a sidecar's (the loader's, two versions kept) and a node's
(models beside .views and .volumes), run as the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.kit.models import write_mlp
from tests.kit.warmpod import error_line, run_warmpod, stage


@pytest.fixture
def sidecar_store(tmp_path: Path) -> Path:
    """What `warmpod load` leaves: model m staged twice from a source that changed (versions 1 and 2, current 2),
    model n once; each model's .lock and staging/ beside its versions."""
    store, source = tmp_path / "store", tmp_path / "src"
    stage(write_mlp(source / "m", (8, 16, 2), seed=1), store, "m")
    stage(write_mlp(source / "m", (8, 16, 2), seed=2), store, "m")
    stage(write_mlp(source / "n", (4, 4, 2)), store, "n")
    return store


def sizes(store: Path, model: str, version: str) -> int:
    return sum(p.stat().st_size for p in (store / model / "versions" / version).rglob("*") if p.is_file())


@pytest.mark.process
def test_a_sidecar_store_as_a_table_and_as_json(sidecar_store: Path, tmp_path: Path) -> None:
    proc = run_warmpod("store", "ls", sidecar_store)
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split() == ["MODEL", "VERSION", "CURRENT", "BYTES", "CREATED", "SOURCE"]
    cells = [row.split() for row in rows]
    assert [(c[0], c[1], c[2] == "*") for c in cells] == [("m", "1", False), ("m", "2", True), ("n", "1", True)]
    assert all(c[-1] == str(tmp_path / "src" / c[0]) for c in cells)

    proc = run_warmpod("store", "ls", sidecar_store, "--json")
    assert proc.returncode == 0, proc.stderr
    listing = json.loads(proc.stdout)
    m, n = listing["models"]
    assert (m["name"], m["current"], n["name"], n["current"]) == ("m", "2", "n", "1")
    assert [v["version"] for v in m["versions"]] == ["1", "2"]
    assert [v["current"] for v in m["versions"]] == [False, True]
    assert m["versions"][1]["bytes"] == sizes(sidecar_store, "m", "2")
    assert m["bytes"] == sizes(sidecar_store, "m", "1") + sizes(sidecar_store, "m", "2")
    assert listing["bytes"] == m["bytes"] + n["bytes"]
    assert m["versions"][0]["source"] == str(tmp_path / "src" / "m")
    assert m["versions"][0]["created_at"].endswith("Z")


@pytest.mark.process
def test_a_node_store_skips_its_dot_directories(tmp_path: Path) -> None:
    store = tmp_path / "node"
    stage(write_mlp(tmp_path / "src" / "a", (4, 8, 2)), store, "a")
    (store / ".views" / "a" / "a").mkdir(parents=True)
    (store / ".volumes").mkdir()
    (store / ".volumes" / "csi-1.json").write_text('{"volume_id": "csi-1", "model": "a"}')
    (store / "b" / "staging").mkdir(parents=True)  # a load that never published

    listing = json.loads(run_warmpod("store", "ls", store, "--json").stdout)
    assert [(m["name"], m["current"], len(m["versions"])) for m in listing["models"]] == [("a", "1", 1)]
    table = run_warmpod("store", "ls", store).stdout
    assert ".views" not in table and ".volumes" not in table


@pytest.mark.process
def test_an_empty_store_and_a_missing_one(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    proc = run_warmpod("store", "ls", tmp_path / "empty")
    assert (proc.returncode, proc.stdout.strip()) == (0, f"no models in {tmp_path / 'empty'}")
    proc = run_warmpod("store", "ls", tmp_path / "nowhere")
    assert proc.returncode == 2
    assert error_line(proc, "warmpod store") == (
        f"warmpod store: error: ROOT {tmp_path / 'nowhere'}: not a directory (a store root, e.g. /dev/shm/warmpod)"
    )
