"""MLPs on the edge: outputs within 1e-5 of the torch server for every activation, the server's 400s for bad
inputs, and `warmpod edge serve` surviving hostile engines (endless loop, memory hog) and refusing broken ones."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.kit.clients import post_json
from tests.kit.models import write_mlp
from tests.kit.warmpod import WarmpodServer, stage
from tests.wasm.edgeutil import epoch_threads, error_line, run_edge
from tests.wasm.hostile import HOG, LOOP, write_engine
from warmpod.server.errors import ModelError
from warmpod.server.families import build_model
from warmpod.server.tensors import Tensor
from warmpod.store import open_model
from warmpod.wasm.app import EdgeConfig, load_edge

TOLERANCE = 1e-5
LABELS = ["setosa", "versicolor", "virginica"]

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "sigmoid", "identity"])
@pytest.mark.parametrize("output_activation", [None, "softmax", "sigmoid"])
def test_every_activation_matches_torch(
    tmp_path: Path, cache: Path, activation: str, output_activation: str | None
) -> None:
    src = write_mlp(tmp_path / "mlp", (13, 64, 31, 7), activation=activation,
                        output_activation=output_activation, seed=3)  # fmt: skip
    stage(src, tmp_path / "store", "m")
    with (
        contextlib.closing(build_model(open_model(tmp_path / "store", "m"))) as torch_model,
        contextlib.closing(load_edge(EdgeConfig(src, cache_dir=cache), workers=1, deadline_s=10)) as edge,
    ):
        for rows in (1, 3, 17, 64):
            x = np.random.default_rng(rows).standard_normal((rows, 13)).astype(np.float32) * 2
            request = {"input": Tensor("input", "FP32", x.shape, x)}
            (want,) = torch_model.run([torch_model.prepare(request)])
            (got,) = edge.run([edge.prepare(request)])
            assert sorted(got) == sorted(want)
            for name in want:
                assert float(np.abs(got[name] - want[name]).max()) <= TOLERANCE, (name, rows)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mlp(tmp_path_factory.mktemp("src") / "iris", (4, 16, 3), labels=LABELS)


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def servers(
    mlp: Path, cache: Path, logs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WarmpodServer, WarmpodServer]]:
    store = tmp_path_factory.mktemp("store")
    stage(mlp, store, "iris")
    env = {"WARMPOD_WASM_CACHE": str(cache)}
    # A model directory served directly: compiled to an FP32 bundle at start.
    with (
        WarmpodServer(store, "iris", log_dir=logs) as torch_server,
        WarmpodServer.edge(mlp, log_dir=logs, env=env) as e,
    ):
        yield torch_server, e


def _infer(server: WarmpodServer, inputs: list[dict[str, Any]], model: str = "iris") -> tuple[int, dict[str, Any]]:
    return post_json(f"{server.url}/v2/models/{model}/infer", {"inputs": inputs})


def _input(x: np.ndarray, name: str = "input", datatype: str = "FP32") -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": list(x.shape), "data": x.reshape(-1).tolist()}


def test_served_outputs_match_the_torch_server(servers: tuple[WarmpodServer, WarmpodServer]) -> None:
    torch_server, edge = servers
    x = np.random.default_rng(7).standard_normal((9, 4)).astype(np.float32)
    (s1, want), (s2, got) = _infer(torch_server, [_input(x)]), _infer(edge, [_input(x)])
    assert s1 == s2 == 200
    by_name = {o["name"]: o for o in got["outputs"]}
    for out in want["outputs"]:
        if out["datatype"] == "BYTES":
            assert by_name[out["name"]]["data"] == out["data"]
        else:
            assert np.abs(np.array(by_name[out["name"]]["data"]) - np.array(out["data"])).max() <= TOLERANCE


@pytest.mark.parametrize(
    "inputs",
    [
        [_input(np.zeros((1, 5), np.float32))],
        [_input(np.zeros((1, 4), np.int32), datatype="INT32")],
        [_input(np.zeros((1, 4), np.float32), name="x")],
        [_input(np.zeros((1, 4), np.float32)), _input(np.zeros((1, 4), np.float32), name="extra")],
        [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1.0, 2.0]}],
        [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": ["a", "b", "c", "d"]}],
    ],
)
def test_wrong_inputs_get_the_servers_400(servers: tuple[WarmpodServer, WarmpodServer], inputs: list[Any]) -> None:
    torch_server, edge = servers
    want, got = _infer(torch_server, inputs), _infer(edge, inputs)
    assert got == want and got[0] == 400


# ------------------------------------------------------------------------------- hostile and broken engines


def test_hostile_engine_is_stopped_and_the_server_carries_on(
    tmp_path: Path, mlp: Path, logs: Path, cache: Path
) -> None:
    engine = write_engine(tmp_path / "hostile.wasm")
    args = ("--engine", str(engine), "--request-timeout", "0.5", "--max-memory", "48MiB")
    with WarmpodServer.edge(mlp, *args, log_dir=logs, env={"WARMPOD_WASM_CACHE": str(cache)}) as edge:
        normal = [_input(np.ones((1, 4), np.float32))]

        started = time.monotonic()
        status, body = _infer(edge, [_input(np.full((1, 4), LOOP, np.float32))])
        assert status == 504 and "deadline" in body["error"]
        assert time.monotonic() - started < 3
        # One worker: this can only be answered once the looping guest was interrupted and its instance replaced.
        assert _infer(edge, normal)[0] == 200
        assert "replacing an engine instance that trapped or was interrupted" in edge.log()

        status, body = _infer(edge, [_input(np.full((1, 4), HOG, np.float32))])
        # a guest that runs out of its memory limit: the request does not fit it, 413 naming the limit (a 500 before)
        assert status == 413 and "hostile test engine: out of memory" in body["error"]
        assert "the memory limit is 48 MiB" in body["error"]
        assert _infer(edge, normal)[0] == 200
        assert edge.ready()
        edge.signal(signal.SIGTERM)
        assert edge.wait(30) == 0


# ------------------------------------------------------------------------------- closing: no engine left behind


def test_closing_the_model_stops_its_engines_ticker(mlp: Path, cache: Path) -> None:
    before = epoch_threads()
    edge = load_edge(EdgeConfig(mlp, cache_dir=cache), workers=2, deadline_s=10)
    assert len(epoch_threads() - before) == 1  # one engine (one ticker) for all the workers' instances
    edge.close()
    assert epoch_threads() - before == set()


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        ({"abi": 2}, "edge bundle 'iris': the engine speaks ABI 2; this host speaks ABI 1"),
        ({"run_status": -4}, r"edge bundle 'iris': the warm-up forward failed: a batch of 1x0: .* \(bad input\)"),
    ],
)
def test_a_model_that_fails_to_load_leaves_no_engine_behind(
    tmp_path: Path, mlp: Path, cache: Path, engine: dict[str, int], message: str
) -> None:
    wasm = write_engine(tmp_path / "refusing.wasm", **engine)
    before = epoch_threads()
    with pytest.raises(ModelError, match=message):
        load_edge(EdgeConfig(mlp, engine=wasm, cache_dir=cache), workers=1, deadline_s=10)
    assert epoch_threads() - before == set()


def _serve_fails(source: Path, *args: str, cache: Path) -> tuple[int, str]:
    proc = run_edge("serve", source, "--port", "0", *args, cache=cache, timeout=60)
    return proc.returncode, error_line(proc, "warmpod edge serve")


def test_malformed_engine_refuses_to_start(tmp_path: Path, mlp: Path, cache: Path) -> None:
    bad = tmp_path / "truncated.wasm"
    bad.write_bytes((Path(__file__).parents[2] / "wasm/engine/warmpod_engine.wasm").read_bytes()[:5000])
    code, line = _serve_fails(mlp, "--engine", str(bad), cache=cache)
    assert code == 5 and f"engine module {bad} is not valid WebAssembly" in line


def test_bundle_that_does_not_fit_refuses_to_start(tmp_path: Path, mlp: Path, cache: Path) -> None:
    bundle = tmp_path / "bundle"
    assert run_edge("compile", mlp, "-o", bundle, cache=cache).returncode == 0
    manifest = json.loads((bundle / "edge.json").read_text())
    manifest["config"]["sizes"] = [4, 15, 3]
    (bundle / "edge.json").write_text(json.dumps(manifest))
    code, line = _serve_fails(bundle, cache=cache)
    assert code == 5
    assert "mis-shaped tensors: layers.0.weight is [16, 4], the graph wants [15, 4]" in line


def test_not_a_directory(tmp_path: Path, cache: Path) -> None:
    code, line = _serve_fails(tmp_path / "nowhere", cache=cache)
    assert code == 2 and "is not a directory (an edge bundle or a model directory)" in line
