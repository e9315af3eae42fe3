"""The OpenAPI document (server/openapi.json, served at GET /openapi.json) against the running server: schemathesis
generates requests for every operation from it — valid ones, ones aimed at the served model, invalid ones — and every
response must be documented (status, content type, headers, body schema), errors included, and never a 5xx but the
deadline a request asked for."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.kit.clients import http
from tests.kit.models import write_mlp
from tests.kit.warmpod import WarmpodServer, stage
from warmpod import __version__
from warmpod.server.openapi import document

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

MODEL = "mlp"
EXAMPLES = 500  # requests in all (about 10 s); the same ones every run (derandomized)
TIME_LIMIT_S = 30.0  # on a slow machine, fewer


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WarmpodServer]:
    root = tmp_path_factory.mktemp("openapi")
    src = write_mlp(root / "src", sizes=(4, 8, 3), seed=5, labels=["a", "b", "c"], output_activation="softmax")
    stage(src, root / "store", MODEL)
    with WarmpodServer(root / "store", MODEL, log_dir=root) as srv:
        yield srv


def test_the_served_document_is_the_shipped_one(server: WarmpodServer) -> None:
    status, headers, body = http("GET", server.url + "/openapi.json")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    served = json.loads(body)
    assert served == document(__version__) and served["info"]["version"] == __version__
    shipped = json.loads((Path(__file__).parents[2] / "server" / "openapi.json").read_text(encoding="utf-8"))
    assert served["paths"] == shipped["paths"] and served["components"] == shipped["components"]


def no_server_error(response: Any, case: Case) -> None:
    """No 5xx, except the 504 of a request that asked for a deadline (parameters.timeout) shorter than its run."""
    if response.status_code < 500:
        return
    asked = isinstance(case.body, dict) and isinstance(case.body.get("parameters"), dict)
    asked = asked and "timeout" in case.body["parameters"]
    assert response.status_code == 504 and asked, f"{response.status_code} {response.text[:500]}"


@schemathesis.check
def no_5xx(ctx: Any, response: Any, case: Case) -> None:
    no_server_error(response, case)


@schemathesis.check
def errors_as_documented(ctx: Any, response: Any, case: Case) -> bool | None:
    """An error's body has its documented schema (for a request outside the document, only errors are held to it:
    GET /v2/models/stats is not a model named "stats", it is the statistics of every model)."""
    if response.status_code < 400:
        return None
    return response_schema_conformance(ctx, response, case)


AS_DOCUMENTED = [status_code_conformance, content_type_conformance, response_headers_conformance]
CHECKS = {
    GenerationMode.POSITIVE: [no_5xx, *AS_DOCUMENTED, response_schema_conformance],
    GenerationMode.NEGATIVE: [no_5xx, *AS_DOCUMENTED, errors_as_documented],
}


def test_fuzz_from_the_document(server: WarmpodServer) -> None:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    version = requests.get(f"{server.url}/v2/models/{MODEL}", timeout=10).json()["versions"][0]
    served = {"model": MODEL, "version": version}  # half the requests name the served model and version
    cases = st.one_of(
        *(
            st.tuples(st.just(mode), schema.as_strategy(mode, path_parameters=fixed), st.booleans())
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
            for fixed in (None, served)
        )
    )
    seen: dict[tuple[str, int], int] = {}
    started = time.monotonic()

    with requests.Session() as session:

        @given(generated=cases)
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(generated: tuple[GenerationMode, Case, bool]) -> None:
            if time.monotonic() - started > TIME_LIMIT_S:
                return
            mode, case, served_in_body = generated
            if served_in_body and isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
                case.body["model"] = MODEL  # /v1/embeddings naming the served model
            response = case.call_and_validate(base_url=server.url, session=session, checks=CHECKS[mode], timeout=30)
            key = (case.operation.label, response.status_code)
            seen[key] = seen.get(key, 0) + 1

        run()
    print(f"{sum(seen.values())} requests in {time.monotonic() - started:.1f} s:")
    for (operation, status), count in sorted(seen.items()):
        print(f"  {operation} {status}: {count}")
    server.check_alive()
    assert {operation for operation, _ in seen} == {r.ok().label for r in schema.get_all_operations()}
    assert sum(seen.values()) >= 100
