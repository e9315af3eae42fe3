"""API keys end to end on `warmpod serve` in a subprocess, with the clients users have: the openai client with and
without its key, tritonclient with the Authorization header, plain requests with malformed headers; what stays
open (health, the metrics site's /metrics) and what does not; the audit log; a key rotation the way a Secret
rotates, under bounded load, with no failed request; a bad file at reload; bad files and exposed addresses at start
(exit 2); the door with mutual TLS; and no key in any log."""

from __future__ import annotations

import datetime
import json
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.kit.certs import CertificateAuthority, ProjectedVolume, client_context
from tests.kit.clients import LoadThread, http, open_triton
from tests.kit.metrics import Scrape
from tests.kit.models import minilm_dir, write_mlp
from tests.kit.procs import wait_until
from tests.kit.warmpod import WarmpodServer, child_env, error_line, run_warmpod, stage, warmpod_cmd
from warmpod.pods.lines import METRICS_LINE

pytestmark = pytest.mark.timeout(180)

MODEL = "all-MiniLM-L6-v2"
KEY_A = "sk-team-a-9f2c6d1e8b7a4c3d"
KEY_B = "sk-team-b-1a2b3c4d5e6f7a8b"
WRONG = "sk-wrong-0000111122223333"
USAGE = "send 'Authorization: Bearer <key>' with a key of the server's --api-key-file"
MLP_BODY = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                                   "data": [[1, 2, 3, 4]]}]}).encode()  # fmt: skip


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def metrics_url(server: WarmpodServer) -> str:
    return f"http://127.0.0.1:{server.wait_for(METRICS_LINE, timeout=5).group(1)}"


def no_key_in(text: str, *keys: str) -> list[str]:
    return [key for key in keys if key in text]


# ------------------------------------------------------------------------------------------ one keyed server


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("auth")


@pytest.fixture(scope="module")
def keyed(workdir: Path) -> Iterator[WarmpodServer]:
    """MiniLM behind two tenants' keys, with an audit log and a metrics site."""
    stage(minilm_dir(), workdir / "store", MODEL)
    keys = workdir / "keys"
    keys.write_text(f"# two tenants\nteam-a:{KEY_A}\n\nteam-b:{KEY_B}\n")
    args = ("--api-key-file", str(keys), "--audit-log", str(workdir / "audit.jsonl"), "--metrics-port", "0")
    with WarmpodServer(workdir / "store", MODEL, *args, log_dir=workdir) as server:
        yield server


def test_openai_client_with_its_key_without_and_with_a_wrong_one(keyed: WarmpodServer) -> None:
    with openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY_A, max_retries=0, timeout=60) as client:
        result = client.embeddings.create(model=MODEL, input=["a key opens the door", "twice"])
        assert [len(d.embedding) for d in result.data] == [384, 384]
        assert [m.id for m in client.models.list()] == [MODEL]
    # Without a key: openai-python sends no Authorization only when told to omit it (an empty key is refused by the
    # client itself).
    anonymous = openai.OpenAI(base_url=keyed.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    wrong = openai.OpenAI(base_url=keyed.url + "/v1", api_key=WRONG, max_retries=0, timeout=60)
    for client, message, extra in ((anonymous, "missing API key", {"Authorization": openai.omit}),
                                   (wrong, "unknown API key", {})):  # fmt: skip
        with client, pytest.raises(openai.AuthenticationError) as raised:
            client.embeddings.create(model=MODEL, input=["no"], extra_headers=extra)
        assert raised.value.status_code == 401
        assert isinstance(raised.value.body, dict)
        assert raised.value.message == f"Error code: 401 - {raised.value.body['message']}"
        assert raised.value.body["message"].startswith(message) and raised.value.body["message"].endswith(USAGE)
        assert raised.value.body["code"] == "unauthorized"
        assert raised.value.response.headers["WWW-Authenticate"].startswith('Bearer realm="warmpod"')


def test_tritonclient_with_the_header_and_without(keyed: WarmpodServer) -> None:
    text = httpclient.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.array([b"triton", b"sends headers"], dtype=object))
    with open_triton(keyed.host_port) as triton:
        assert triton.is_server_live() and triton.is_server_ready()  # probes need no key
        result = triton.infer(MODEL, [text], headers=bearer(KEY_B))
        assert result.as_numpy("embedding").shape == (2, 384)
        assert triton.get_model_metadata(MODEL, headers=bearer(KEY_B))["name"] == MODEL
        for headers, message in ((None, "missing API key"), (bearer(WRONG), "unknown API key")):
            with pytest.raises(InferenceServerException) as raised:
                triton.infer(MODEL, [text], headers=headers)
            assert raised.value.status() == "401"
            assert raised.value.message().startswith(message) and raised.value.message().endswith(USAGE)
        with pytest.raises(InferenceServerException) as raised:
            triton.get_server_metadata()
        assert raised.value.message().startswith("missing API key")


@pytest.mark.parametrize(
    ("authorization", "message", "code"),
    [
        (None, "missing API key", None),
        ("", "empty Authorization header", "invalid_request"),
        ("Bearer", "Authorization: Bearer without a key", "invalid_request"),
        ("Bearer ", "Authorization: Bearer without a key", "invalid_request"),
        (f"Basic {KEY_A}", "malformed Authorization header: the Basic scheme is not supported", "invalid_request"),
        (KEY_A, "malformed Authorization header: it is not 'Bearer <key>'", "invalid_request"),
        (f"Bearer {KEY_A} {KEY_B}", "malformed Authorization header: the Bearer key must be one word",
         "invalid_request"),
        (f"Bearer {WRONG}", "unknown API key (revoked, mistyped or from another server)", "invalid_token"),
        (f"Bearer {KEY_A}x", "unknown API key", "invalid_token"),
    ],
)  # fmt: skip
def test_every_bad_authorization_is_401_with_a_challenge_in_each_protocols_shape(
    keyed: WarmpodServer, authorization: str | None, message: str, code: str | None
) -> None:
    headers = {"Content-Type": "application/json"} | ({} if authorization is None else {"Authorization": authorization})
    challenge = 'Bearer realm="warmpod"' + (f', error="{code}"' if code else "")
    v2_status, v2_headers, v2_body = http("POST", keyed.url + f"/v2/models/{MODEL}/infer", b"{}", headers)
    oa_status, oa_headers, oa_body = http("POST", keyed.url + "/v1/embeddings", b"{}", headers)
    assert (v2_status, oa_status) == (401, 401)
    assert v2_headers["WWW-Authenticate"] == oa_headers["WWW-Authenticate"] == challenge
    v2_error = json.loads(v2_body)["error"]
    oa_error = json.loads(oa_body)["error"]
    assert v2_error.startswith(message) and v2_error.endswith(USAGE)
    assert oa_error == {"message": v2_error, "type": "invalid_request_error", "param": None, "code": "unauthorized"}
    assert no_key_in(v2_error, KEY_A, KEY_B, WRONG) == []


def test_health_is_open_metrics_only_on_the_metrics_site_everything_else_keyed(keyed: WarmpodServer) -> None:
    private = metrics_url(keyed)
    for url in (keyed.url, private):
        assert http("GET", url + "/v2/health/live")[0] == 200
        assert http("GET", url + "/v2/health/ready")[0] == 200
    scrape = Scrape(private)  # no key: Prometheus scrapes the metrics site
    assert scrape.value("warmpod_auth_keys") == 2
    public = http("GET", keyed.url + "/metrics")
    assert public[0] == 401 and json.loads(public[2])["error"].startswith("missing API key")
    assert http("GET", keyed.url + "/metrics", headers=bearer(KEY_A))[0] == 200
    # The metrics site serves nothing else without a key: it is plain HTTP, maybe on another address.
    for method, path in (("GET", "/v2"), ("GET", f"/v2/models/{MODEL}"), ("POST", "/v1/embeddings"),
                         ("GET", "/openapi.json"), ("GET", "/v2/no/such/route")):  # fmt: skip
        status, _, body = http(method, private + path, b"{}" if method == "POST" else None)
        error = json.loads(body)["error"]
        message = error["message"] if path.startswith("/v1/") else error  # each protocol's shape
        assert status == 401 and message.startswith("missing API key"), (path, status, body)
    assert http("GET", private + "/v2", headers=bearer(KEY_B))[0] == 200


def audit_lines(path: Path, request_id: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [line for line in lines if line["request_id"] == request_id]


def test_the_audit_log_has_one_line_per_request_answered_or_refused(keyed: WarmpodServer, workdir: Path) -> None:
    audit = workdir / "audit.jsonl"
    body = json.dumps({"model": MODEL, "input": ["one", "two", "three"]}).encode()
    sent = {
        "audit-ok-1": (bearer(KEY_A), 200),
        "audit-denied-1": (bearer(WRONG), 401),
        "audit-unknown-model": (bearer(KEY_B), 404),
    }
    for rid, (headers, status) in sent.items():
        body_for = body if rid != "audit-unknown-model" else body.replace(MODEL.encode(), b"nope")
        got = http("POST", keyed.url + "/v1/embeddings", body_for, headers | {"X-Request-Id": rid})
        assert got[0] == status and got[1]["X-Request-Id"] == rid
    insane = http("POST", keyed.url + "/v1/embeddings", body, bearer(KEY_A) | {"X-Request-Id": "has a space"})
    made = insane[1]["X-Request-Id"]
    assert insane[0] == 200 and len(made) == 32 and made != "has a space"
    assert http("GET", keyed.url + "/v2/health/live")[1]["X-Request-Id"]  # every response has one
    wait_until(lambda: len(audit_lines(audit, made)) == 1, timeout=10, what="the audit lines")
    (ok,) = audit_lines(audit, "audit-ok-1")
    assert {k: ok[k] for k in ("tenant", "model", "version", "method", "route", "rows", "status", "reason")} == {
        "tenant": "team-a", "model": MODEL, "version": "1", "method": "POST", "route": "/v1/embeddings", "rows": 3,
        "status": 200, "reason": None,
    }  # fmt: skip
    assert 0 < ok["latency_ms"] < 60_000 and ok["client"] == "127.0.0.1"
    when = datetime.datetime.fromisoformat(ok["time"])
    assert ok["time"].endswith("Z") and abs((datetime.datetime.now(datetime.UTC) - when).total_seconds()) < 120
    (denied,) = audit_lines(audit, "audit-denied-1")
    assert (denied["tenant"], denied["status"], denied["reason"], denied["model"]) == (None, 401, "unauthorized", None)
    (unknown,) = audit_lines(audit, "audit-unknown-model")
    assert (unknown["tenant"], unknown["model"], unknown["status"], unknown["reason"]) == ("team-b", "nope", 404,
                                                                                          "not_found")  # fmt: skip
    # V2: the model and version from the route, the rows from the tensors.
    text = httpclient.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.array([b"a", b"b"], dtype=object))
    with open_triton(keyed.host_port) as triton:
        triton.infer(MODEL, [text], model_version="1", headers=bearer(KEY_B) | {"X-Request-Id": "audit-v2"})
    wait_until(lambda: len(audit_lines(audit, "audit-v2")) == 1, timeout=10, what="the V2 audit line")
    (v2,) = audit_lines(audit, "audit-v2")
    assert (v2["tenant"], v2["model"], v2["version"], v2["rows"], v2["status"]) == ("team-b", MODEL, "1", 2, 200)
    assert v2["route"] == f"/v2/models/{MODEL}/versions/1/infer"
    # Probes and metadata are not audited; a refused metadata request is.
    assert all(line["route"] != "/v2/health/live" for line in map(json.loads, audit.read_text().splitlines()))


def test_no_key_reaches_the_server_log_or_the_audit_log(keyed: WarmpodServer, workdir: Path) -> None:
    for headers in (bearer(KEY_A), bearer(KEY_B), bearer(WRONG), {"Authorization": KEY_A},
                    {"Authorization": f"Basic {KEY_B}"}, {"Authorization": f"Bearer {KEY_A} {WRONG}"},
                    {"X-Request-Id": KEY_A}):  # fmt: skip
        http("POST", keyed.url + "/v1/embeddings", json.dumps({"model": MODEL, "input": ["x"]}).encode(), headers)
        http("GET", keyed.url + "/v2", headers=headers)
    audit = (workdir / "audit.jsonl").read_text()
    assert audit.count("\n") >= 7  # the requests above are there, without their keys
    assert no_key_in(keyed.log(), KEY_A, KEY_B, WRONG) == []
    # The client's X-Request-Id is echoed (it is its own); no Authorization value is.
    assert no_key_in(audit.replace(f'"request_id":"{KEY_A}"', ""), KEY_A, KEY_B, WRONG) == []


# ------------------------------------------------------------------------------------------ rotation


@pytest.fixture(scope="module")
def mlp_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mlp_store")
    stage(write_mlp(tmp_path_factory.mktemp("src") / "mlp"), root, "mlp")
    return root


def test_a_secret_rotation_under_load_fails_nothing_revokes_and_adds(mlp_store: Path, tmp_path: Path) -> None:
    stay, gone, new = "sk-stays-aaaaaaaaaaaa", "sk-revoked-bbbbbbbbbb", "sk-added-cccccccccccc"
    secret = ProjectedVolume(tmp_path / "secret", {"keys": f"a:{stay}\nb:{gone}\n".encode()})
    args = ("--api-key-file", str(secret.path("keys")), "--metrics-port", "0")
    with WarmpodServer(mlp_store, "mlp", *args, log_dir=tmp_path) as server:
        private = metrics_url(server)
        assert http("POST", server.url + "/v2/models/mlp/infer", MLP_BODY, bearer(gone))[0] == 200
        load = LoadThread(server.url + "/v2/models/mlp/infer", json.loads(MLP_BODY), workers=2, max_requests=3000,
                          max_seconds=60, headers=bearer(stay)).start()  # fmt: skip
        try:
            wait_until(lambda: len(load.results) >= 50, timeout=30, what="requests before the rotation")
            secret.update({"keys": f"a:{stay}\nc:{new}\n".encode()})  # the kubelet's ..data swap
            wait_until(lambda: Scrape(private).value("warmpod_auth_reloads_total") == 1, timeout=15,
                       what="the key file reloaded")  # fmt: skip
            after = len(load.results)
            wait_until(lambda: len(load.results) >= after + 50, timeout=30, what="requests after the rotation")
        finally:
            results = load.stop()
        statuses = [status for _, _, status, _, _ in results]
        assert len(statuses) >= 100 and set(statuses) == {200}, sorted(set(map(str, statuses)))
        status, headers, body = http("POST", server.url + "/v2/models/mlp/infer", MLP_BODY, bearer(gone))
        assert status == 401 and json.loads(body)["error"].startswith("unknown API key (revoked")
        assert headers["WWW-Authenticate"] == 'Bearer realm="warmpod", error="invalid_token"'
        assert http("POST", server.url + "/v2/models/mlp/infer", MLP_BODY, bearer(new))[0] == 200
        # A bad file at reload: the keys stay, the error is counted and logged (naming the line, not the key).
        secret.update({"keys": f"a:{stay}\nc {new}\n".encode()})
        wait_until(lambda: Scrape(private).value("warmpod_auth_reload_errors_total") == 1, timeout=15,
                   what="the bad key file refused")  # fmt: skip
        for key in (stay, new):
            assert http("POST", server.url + "/v2/models/mlp/infer", MLP_BODY, bearer(key))[0] == 200
        scrape = Scrape(private)
        assert (scrape.value("warmpod_auth_reloads_total"), scrape.value("warmpod_auth_keys")) == (1, 2)
        log = server.log()
        assert (f"API key file reload failed, keeping the 2 key(s) loaded before: --api-key-file "
                f"{secret.path('keys')} line 2: expected TENANT:KEY") in log  # fmt: skip
        assert no_key_in(log, stay, gone, new) == []


# ------------------------------------------------------------------------------------------ at start


def serve_error(store: Path, *args: str) -> str:
    proc = run_warmpod("serve", "--model", "mlp", "--store", store, "--port", "0", *args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    return error_line(proc, "warmpod serve")


def test_a_key_file_that_cannot_be_used_stops_the_start(mlp_store: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("# nothing yet\n")
    (tmp_path / "malformed").write_text(f"team-a:{KEY_A}\nteam b:{KEY_B}\n")
    cases = {
        tmp_path / "missing": ": cannot read it: No such file or directory",
        tmp_path: ": cannot read it: Is a directory",
        tmp_path / "empty": ": no keys in it (expected TENANT:KEY lines); an empty key file would lock every client "
        "out",
        tmp_path / "malformed": " line 2: the tenant name must be 1 to 64 of A-Z a-z 0-9 . _ - (it is used in metric "
        "labels and logs)",
    }
    for path, message in cases.items():
        line = serve_error(mlp_store, "--api-key-file", str(path))
        assert line == f"warmpod serve: error: --api-key-file {path}{message}"
        assert no_key_in(line, KEY_A, KEY_B) == []
    unreadable = tmp_path / "unreadable"
    unreadable.write_text(f"team-a:{KEY_A}\n")
    unreadable.chmod(0o000)
    # root reads any file; drop the capabilities that let it, so the kernel answers as it would for a pod's user
    without_override = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]
    cmd = [*without_override, *warmpod_cmd("serve", "--model", "mlp", "--store", mlp_store, "--port", "0",
                                           "--api-key-file", unreadable)]  # fmt: skip
    proc = subprocess.run(
        cmd, env=child_env(None), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 2, proc.stderr
    assert error_line(proc, "warmpod serve") == (
        f"warmpod serve: error: --api-key-file {unreadable}: cannot read it: Permission denied"
    )
    line = serve_error(mlp_store, "--audit-log", str(tmp_path / "no" / "audit.jsonl"))
    assert line == (f"warmpod serve: error: --audit-log {tmp_path}/no/audit.jsonl: cannot open it for appending: No "
                    "such file or directory")  # fmt: skip


def test_key_less_on_an_address_others_reach_is_refused_unless_allowed(mlp_store: Path, tmp_path: Path) -> None:
    wanted = ("is reachable from other machines and no client needs a key: give --api-key-file (or --tls-client-ca), "
              "or --allow-unauthenticated to serve anyone who reaches it")  # fmt: skip
    assert serve_error(mlp_store, "--host", "0.0.0.0") == f"warmpod serve: error: --host 0.0.0.0 {wanted}"
    line = serve_error(mlp_store, "--metrics-host", "0.0.0.0", "--metrics-port", "0")
    assert line == f"warmpod serve: error: --metrics-host 0.0.0.0 {wanted}"
    up = run_warmpod("up", str(tmp_path / "src"), "--model", "mlp", "--host", "0.0.0.0", timeout=60)
    assert up.returncode == 2
    assert error_line(up, "warmpod up") == f"warmpod up: error: --host 0.0.0.0 {wanted} (after --, for the workers)"
    # Allowed (or with a key), the door lets it go on to bind: shown without exposing anything, on a port already
    # taken on 127.0.0.1, so the bind of 0.0.0.0 fails after the check.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        keys = tmp_path / "keys"
        keys.write_text(f"a:{KEY_A}\n")
        for door in (("--allow-unauthenticated",), ("--api-key-file", str(keys))):
            proc = run_warmpod("serve", "--model", "mlp", "--store", mlp_store, "--host", "0.0.0.0", "--port", port,
                               *door, timeout=60)  # fmt: skip
            assert proc.returncode == 2
            assert error_line(proc, "warmpod serve").startswith(
                f"warmpod serve: error: cannot listen on 0.0.0.0:{port}"
            )


# ------------------------------------------------------------------------------------------ with mutual TLS


def test_a_client_certificate_names_the_tenant_and_a_key_with_it_must_agree(mlp_store: Path, tmp_path: Path) -> None:
    ca = CertificateAuthority("auth test root")
    cert, key = ca.server().write(tmp_path / "tls", "server")
    args = ("--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(ca.write(tmp_path / "ca.pem")),
            "--api-key-file", str(tmp_path / "keys"), "--audit-log", str(tmp_path / "audit.jsonl"))  # fmt: skip
    (tmp_path / "keys").write_text(f"team-a:{KEY_A}\nteam-b:{KEY_B}\n")
    team_a: ssl.SSLContext = client_context(ca, ca.client("team-a"), directory=tmp_path / "client")
    with WarmpodServer(mlp_store, "mlp", *args, log_dir=tmp_path, tls=team_a) as server:
        infer = server.url + "/v2/models/mlp/infer"
        for rid, headers, status in (("cert-alone", {}, 200), ("cert-and-its-key", bearer(KEY_A), 200),
                                     ("cert-and-another-key", bearer(KEY_B), 401)):  # fmt: skip
            got = http("POST", infer, MLP_BODY, headers | {"X-Request-Id": rid}, context=team_a)
            assert got[0] == status, (rid, got)
        got = http("POST", infer, MLP_BODY, bearer(KEY_B), context=team_a)
        assert json.loads(got[2])["error"] == ("the API key belongs to tenant 'team-b', the client certificate to "
                                               "'team-a': send a key of the certificate's tenant, or none")  # fmt: skip
        wait_until(lambda: len(audit_lines(tmp_path / "audit.jsonl", "cert-and-another-key")) == 1, timeout=10,
                   what="the audit lines")  # fmt: skip
        tenants = {rid: audit_lines(tmp_path / "audit.jsonl", rid)[0]["tenant"]
                   for rid in ("cert-alone", "cert-and-its-key", "cert-and-another-key")}  # fmt: skip
        assert tenants == {"cert-alone": "team-a", "cert-and-its-key": "team-a", "cert-and-another-key": None}
