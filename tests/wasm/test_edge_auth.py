"""The edge has the server's door: `warmpod edge serve --api-key-file` answers 401 without a key and serves with one,
its health stays open, and `--audit-log -` writes the server's audit lines to stderr."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.kit.clients import http
from tests.kit.models import write_mlp
from tests.kit.procs import wait_until
from tests.kit.warmpod import WarmpodServer

pytestmark = pytest.mark.timeout(120)

KEY = "sk-edge-tenant-5e6f7a8b9c0d"
BODY = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [[1, 2, 3, 4]]}]})


def test_the_edge_wants_a_key_too(tmp_path: Path, cache: Path) -> None:
    model = write_mlp(tmp_path / "iris", (4, 8, 3))
    (tmp_path / "keys").write_text(f"edge-team:{KEY}\n")
    args = ("--api-key-file", str(tmp_path / "keys"), "--audit-log", "-")
    with WarmpodServer.edge(model, *args, log_dir=tmp_path, env={"WARMPOD_WASM_CACHE": str(cache)}) as edge:
        url = edge.url + "/v2/models/iris/infer"
        assert http("GET", edge.url + "/v2/health/ready")[0] == 200
        status, headers, body = http("POST", url, BODY.encode(), {"X-Request-Id": "edge-no-key"})
        assert status == 401 and headers["WWW-Authenticate"] == 'Bearer realm="warmpod"'
        assert json.loads(body)["error"].startswith("missing API key: send 'Authorization: Bearer <key>'")
        ok = http("POST", url, BODY.encode(), {"Authorization": f"Bearer {KEY}", "X-Request-Id": "edge-key"})
        assert ok[0] == 200 and json.loads(ok[2])["outputs"]

        def audited() -> dict[str, dict[str, object]]:
            lines = [json.loads(line) for line in edge.log().splitlines() if line.startswith('{"time"')]
            return {str(line["request_id"]): line for line in lines}

        wait_until(lambda: {"edge-no-key", "edge-key"} <= audited().keys(), timeout=10, what="the audit lines")
        assert (audited()["edge-no-key"]["tenant"], audited()["edge-no-key"]["status"]) == (None, 401)
        assert (audited()["edge-key"]["tenant"], audited()["edge-key"]["rows"]) == ("edge-team", 1)
        assert KEY not in edge.log()
