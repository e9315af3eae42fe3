"""The edge has the server's tenants: `warmpod edge serve --tenant-quota` answers 429 with Retry-After to the tenant
over its quota and not to another, and its /metrics counts requests and rejections per tenant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.kit.clients import http
from tests.kit.models import write_mlp
from tests.kit.warmpod import WarmpodServer

pytestmark = pytest.mark.timeout(120)

KEYS = {"edge-x": "sk-edge-x-0a1b2c3d4e5f", "edge-y": "sk-edge-y-6a7b8c9d0e1f"}
BODY = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [[1, 2, 3, 4]]}]})


def test_the_edge_limits_and_counts_each_tenant(tmp_path: Path, cache: Path) -> None:
    model = write_mlp(tmp_path / "iris", (4, 8, 3))
    (tmp_path / "keys").write_text("".join(f"{tenant}:{key}\n" for tenant, key in KEYS.items()))
    args = ("--api-key-file", str(tmp_path / "keys"), "--tenant-quota", "edge-x:requests=0.2",
            "--tenant-weight", "edge-y=2")  # fmt: skip
    with WarmpodServer.edge(model, *args, log_dir=tmp_path, env={"WARMPOD_WASM_CACHE": str(cache)}) as edge:
        url = edge.url + "/v2/models/iris/infer"

        def infer(tenant: str) -> tuple[int, dict[str, str], bytes]:
            return http("POST", url, BODY.encode(), {"Authorization": f"Bearer {KEYS[tenant]}"})

        assert infer("edge-x")[0] == 200
        status, headers, body = infer("edge-x")  # one request per 5 s: the second is over
        assert status == 429 and 1 <= int(headers["Retry-After"]) <= 5
        assert json.loads(body)["error"] == (
            "tenant 'edge-x' is over its quota of 0.2 requests/s (--tenant-quota edge-x:requests=0.2); "
            f"retry in {headers['Retry-After']} s"
        )
        assert [infer("edge-y")[0] for _ in range(3)] == [200, 200, 200]  # no quota of its own, no '*'
        status, _, page = http("GET", edge.url + "/metrics", headers={"Authorization": f"Bearer {KEYS['edge-y']}"})
        assert status == 200
    samples = [s for f in text_string_to_metric_families(page.decode()) for s in f.samples]
    counts = {
        (s.labels["tenant"], s.labels["code"]): s.value for s in samples if s.name == "warmpod_tenant_requests_total"
    }
    assert counts == {("edge-x", "200"): 1, ("edge-x", "429"): 1, ("edge-y", "200"): 3}
    rejected = [(s.labels["tenant"], s.labels["reason"], s.value) for s in samples
                if s.name == "warmpod_tenant_requests_rejected_total"]  # fmt: skip
    assert rejected == [("edge-x", "rate_limited", 1.0)]
