"""TLS and mutual TLS on `warmpod serve` and `warmpod edge serve`: real clients (curl, requests, the openai client,
ssl sockets) against certificates made by a test CA; rotation by a projected volume's symlink swap under bounded
load with no failure; bad reloads that keep the old certificate (counted, logged); every bad file at start → exit 2
with a message. The reload logic itself, and the client certificate reaching a handler, in process."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import re
import ssl
import subprocess
import threading
import time
from http.client import HTTPException, HTTPSConnection
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import requests
import tritonclient.http
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry

from tests.kit.certs import HOUR, CertificateAuthority, Issued, ProjectedVolume, client_context, presented
from tests.kit.clients import http
from tests.kit.metrics import Scrape
from tests.kit.models import write_mlp
from tests.kit.procs import wait_until
from tests.kit.warmpod import WarmpodServer, error_line, run_warmpod, stage
from warmpod.pods.lines import METRICS_LINE
from warmpod.server.tenancy import certificate_tenant
from warmpod.server.tls import Reload, ServerTls, TlsError, TlsFiles, tls_files

pytestmark = pytest.mark.timeout(120)

BODY: dict[str, Any] = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [[1, 2, 3, 4]]}]}


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority("warmpod test root")


@pytest.fixture(scope="module")
def other_ca() -> CertificateAuthority:
    return CertificateAuthority("somebody else's root")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    stage(write_mlp(tmp_path_factory.mktemp("src") / "mlp"), root, "mlp")
    return root


def tls_server(store: Path, cert: Path, key: Path, trust: ssl.SSLContext, *args: str, log_dir: Path) -> WarmpodServer:
    flags = ("--tls-cert", str(cert), "--tls-key", str(key), "--metrics-port", "0", *args)
    return WarmpodServer(store, "mlp", *flags, log_dir=log_dir, tls=trust)


def metrics_url(server: WarmpodServer) -> str:
    """The server's --metrics-port site: plain HTTP, also under TLS."""
    return f"http://127.0.0.1:{server.wait_for(METRICS_LINE, timeout=5).group(1)}"


def curl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = ["curl", "-sS", "--max-time", "10", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


# ------------------------------------------------------------------------------------------ one-way TLS


def test_https_with_a_chain_for_curl_requests_and_openai_with_metrics_port_plain(
    store: Path, ca: CertificateAuthority, tmp_path: Path
) -> None:
    # The certificate is issued by an intermediate; clients trust only the root, so the file's chain must be sent.
    served = ca.intermediate("warmpod test intermediate").server()
    cert, key = served.write(tmp_path / "tls", "server")
    root = str(ca.write(tmp_path / "ca.pem"))
    with tls_server(store, cert, key, client_context(ca), log_dir=tmp_path) as server:
        assert "listening on https://127.0.0.1:" in server.log()
        url = server.url + "/v2/models/mlp/infer"
        ok = curl("--cacert", root, "-H", "Content-Type: application/json", "-d", json.dumps(BODY), url)
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["outputs"][0]["shape"] == [1, 3]
        untrusted = curl(url.replace("/infer", ""))  # the system's CAs only
        assert untrusted.returncode == 60 and "SSL certificate problem" in untrusted.stderr, untrusted
        plain = curl(url.replace("https://", "http://").replace("/infer", ""))
        assert plain.returncode != 0 and plain.stdout == "", plain  # no plain HTTP on the TLS port

        response = requests.post(url, json=BODY, verify=root, timeout=10)
        assert response.status_code == 200 and response.json()["model_name"] == "mlp"
        with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
            requests.get(server.url + "/v2/health/ready", timeout=10)

        import httpx2

        with httpx2.Client(verify=client_context(ca)) as transport:
            client = openai.OpenAI(api_key="unused", base_url=server.url + "/v1", http_client=transport)
            assert [m.id for m in client.models.list()] == ["mlp"]

        triton = tritonclient.http.InferenceServerClient(
            server.host_port, ssl=True, ssl_context_factory=lambda: client_context(ca), network_timeout=10
        )
        try:
            assert triton.is_server_ready() and triton.get_model_metadata("mlp")["name"] == "mlp"
        finally:
            triton.close()

        assert presented(server.port, client_context(ca)) == served.fingerprint
        assert presented(server.port, client_context(ca), "localhost") == served.fingerprint  # with SNI too
        metrics = metrics_url(server)
        assert http("GET", metrics + "/v2/health/ready")[0] == 200
        scrape = Scrape(metrics)
        assert scrape.value("warmpod_tls_certificate_expiry_timestamp_seconds") == pytest.approx(
            served.cert.not_valid_after_utc.timestamp()
        )
        assert scrape.value("warmpod_tls_reloads_total") == 0
        assert scrape.value("warmpod_tls_reload_errors_total") == 0
        assert f"TLS certificate CN=warmpod, serial {served.cert.serial_number:x}, valid until" in server.log()


def test_the_edge_serves_tls_too(ca: CertificateAuthority, tmp_path: Path) -> None:
    cert, key = ca.server().write(tmp_path / "tls", "server")
    mlp = write_mlp(tmp_path / "mlp")
    args = ("--tls-cert", str(cert), "--tls-key", str(key))
    env = {"WARMPOD_WASM_CACHE": str(tmp_path / "cache")}
    with WarmpodServer.edge(mlp, *args, log_dir=tmp_path, env=env, tls=client_context(ca)) as edge:
        assert "warmpod edge serve: listening on https://127.0.0.1:" in edge.log()
        status, _, body = http(
            "POST", edge.url + "/v2/models/mlp/infer", json.dumps(BODY).encode(), context=client_context(ca)
        )
        assert status == 200, body
        assert json.loads(body)["outputs"][0]["shape"] == [1, 3]
        with pytest.raises(ssl.SSLCertVerificationError):
            presented(edge.port, client_context(None))


# ------------------------------------------------------------------------------------------ mutual TLS


def test_mutual_tls_admits_clients_of_the_ca_only(
    store: Path, ca: CertificateAuthority, other_ca: CertificateAuthority, tmp_path: Path
) -> None:
    cert, key = ca.server().write(tmp_path / "tls", "server")
    clients_ca = CertificateAuthority("client ca")
    tenant, stranger = clients_ca.client("team-a"), other_ca.client("team-a")
    tenant_files, stranger_files = _as_str(tenant.write(tmp_path, "team-a")), _as_str(stranger.write(tmp_path, "x"))
    trust = client_context(ca, tenant, directory=tmp_path)
    audit = tmp_path / "audit.jsonl"
    args = ("--tls-client-ca", str(clients_ca.write(tmp_path / "clients-ca.pem")), "--audit-log", str(audit))
    with tls_server(store, cert, key, trust, *args, log_dir=tmp_path) as server:
        url = server.url + "/v2/models/mlp/infer"
        root = str(ca.write(tmp_path / "ca.pem"))
        ok = curl(
            "--cacert", root, "--cert", tenant_files[0], "--key", tenant_files[1], "--json", json.dumps(BODY), url
        )
        assert ok.returncode == 0 and json.loads(ok.stdout)["model_name"] == "mlp", ok
        response = requests.post(url, json=BODY, verify=root, cert=tenant_files, timeout=10)
        assert response.status_code == 200
        # The door (warmpod.server.auth) takes the verified certificate's subject as the tenant: the audit log says so.
        lines = [json.loads(line) for line in audit.read_text().splitlines()]
        infer = [line for line in lines if line["route"].endswith("/infer")]
        assert [(line["tenant"], line["status"]) for line in infer] == [("team-a", 200)] * 2, lines

        # Refused at the handshake (TLS 1.2, where the server's verdict comes within the handshake: it hangs up), ...
        for who in (stranger, None):
            context = client_context(ca, who, directory=tmp_path, tls_max=ssl.TLSVersion.TLSv1_2)
            with pytest.raises(ssl.SSLError):
                presented(server.port, context)
        # ... and under TLS 1.3 no answer comes: the connection is closed instead.
        for extra in (["--cert", stranger_files[0], "--key", stranger_files[1]], []):
            refused = curl("--cacert", root, *extra, url.replace("/infer", ""))
            assert refused.returncode in (35, 52, 56) and refused.stdout == "", refused
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(url.replace("/infer", ""), verify=root, cert=stranger_files, timeout=10)
        assert http("GET", metrics_url(server) + "/v2/health/ready")[0] == 200  # probes need no certificate


def _as_str(pair: tuple[Path, Path]) -> tuple[str, str]:
    return str(pair[0]), str(pair[1])


async def _tenant(request: web.Request) -> web.Response:
    peercert = request.transport.get_extra_info("peercert") if request.transport else None
    return web.Response(text=str(certificate_tenant(peercert)))


def test_the_verified_client_certificate_reaches_a_handler_and_client_ca_rotation_applies(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """In process: an aiohttp site on ServerTls's context; the handler sees the client's subject (the tenant), and
    after the client CA is rotated, clients of the old CA are refused and those of the new one admitted."""
    old_ca, new_ca = CertificateAuthority("old clients"), CertificateAuthority("new clients")
    cert, key = ca.server().write(tmp_path, "server")
    volume = ProjectedVolume(tmp_path / "ca", {"ca.crt": old_ca.pem})
    tls = ServerTls.load(TlsFiles(cert, key, volume.path("ca.crt")))
    old_client, new_client = old_ca.client("team-old"), new_ca.client("team-new")

    async def main() -> list[str]:
        app = web.Application()
        app.router.add_get("/tenant", _tenant)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.context)
        await site.start()
        port = runner.addresses[0][1]

        async def ask(client: Issued) -> str:
            context = client_context(ca, client, directory=tmp_path)
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"https://127.0.0.1:{port}/tenant", ssl=context) as response,
                ):
                    return f"{response.status} {await response.text()}"
            except aiohttp.ClientError as e:
                return type(e).__name__

        seen = [await ask(old_client), await ask(new_client)]
        volume.update({"ca.crt": new_ca.pem})
        seen.append(tls.reload_if_changed().value)
        seen += [await ask(old_client), await ask(new_client)]
        await runner.cleanup()
        return seen

    before_old, before_new, reload, after_old, after_new = asyncio.run(main())
    assert before_old == "200 team-old" and after_new == "200 team-new"
    assert reload == "reloaded"
    assert before_new != "200 team-new" and after_old != "200 team-old"
    assert before_new.endswith("Error") and after_old.endswith("Error"), (before_new, after_old)


# ------------------------------------------------------------------------------------------ rotation


class HttpsLoad:
    """A bounded closed loop over https from background threads: `fresh` clients on a new connection per request
    (each a new handshake) and `kept` clients each on one kept-alive connection. Every result is kept: (status or
    exception name, fingerprint of the certificate the connection shook hands with)."""

    def __init__(self, port: int, context: ssl.SSLContext, *, fresh: int = 2, kept: int = 2,
                 max_requests: int = 4000, max_seconds: float = 60) -> None:  # fmt: skip
        self.port, self.context = port, context
        self.max_requests, self.deadline = max_requests, time.monotonic() + max_seconds
        self.results: list[tuple[int | str, str]] = []
        self.kept_sockets: list[str] = []  # per kept client: every fingerprint its one connection presented
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(False,), daemon=True) for _ in range(fresh)]
        self._threads += [threading.Thread(target=self._run, args=(True,), daemon=True) for _ in range(kept)]

    def __enter__(self) -> HttpsLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def count(self) -> int:
        return len(self.results)

    def _run(self, keep: bool) -> None:
        conn: HTTPSConnection | None = None
        connections = 0
        body = json.dumps(BODY)
        while not self._stop.is_set() and time.monotonic() < self.deadline and len(self.results) < self.max_requests:
            if conn is None:
                conn = HTTPSConnection("127.0.0.1", self.port, context=self.context, timeout=10)
                connections += 1
            try:
                conn.request("POST", "/v2/models/mlp/infer", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                der = conn.sock.getpeercert(binary_form=True) if conn.sock else None
                status: int | str = response.status
            except (OSError, HTTPException) as e:
                status, der = type(e).__name__, None
            self.results.append((status, _sha256(der)))
            if not keep or status != 200:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()
        if keep:
            self.kept_sockets.append(f"{connections} connection(s)")


def _sha256(der: bytes | None) -> str:
    return hashlib.sha256(der).hexdigest() if der else ""


def test_rotation_under_load_has_no_failures_and_new_handshakes_present_the_new_certificate(
    store: Path, ca: CertificateAuthority, tmp_path: Path
) -> None:
    # As the TLS overlay mounts it: a podCertificate volume's one credential bundle (key, then chain) for both flags.
    first, second = ca.server("warmpod-1"), ca.server("warmpod-2")
    volume = ProjectedVolume(tmp_path / "tls", {"credentials.pem": first.bundle_pem})
    bundle = volume.path("credentials.pem")
    trust = client_context(ca)
    with tls_server(store, bundle, bundle, trust, log_dir=tmp_path) as server:
        assert presented(server.port, trust) == first.fingerprint
        with HttpsLoad(server.port, trust, max_seconds=40) as load:
            wait_until(lambda: load.count() >= 50, timeout=15, what="50 requests before the rotation")
            before = load.count()
            volume.update({"credentials.pem": second.bundle_pem})  # one rename, as the kubelet does
            wait_until(lambda: presented(server.port, trust) == second.fingerprint, timeout=10, interval=0.1,
                       what="the new certificate on a new handshake")  # fmt: skip
            assert presented(server.port, trust, "localhost") == second.fingerprint
            rotated = load.count()
            wait_until(lambda: load.count() >= rotated + 50, timeout=15, what="50 requests after the rotation")
        results = list(load.results)
        failures = [r for r in results if r[0] != 200]
        assert not failures, failures[:5]
        assert len(results) > before + 100, len(results)
        fingerprints = {r[1] for r in results}
        assert fingerprints == {first.fingerprint, second.fingerprint}
        # The kept-alive connections were never dropped: one connection each, all through the rotation.
        assert load.kept_sockets == ["1 connection(s)", "1 connection(s)"]
        scrape = Scrape(metrics_url(server))
        assert scrape.value("warmpod_tls_reloads_total") == 1
        assert scrape.value("warmpod_tls_reload_errors_total") == 0
        assert scrape.value("warmpod_tls_certificate_expiry_timestamp_seconds") == pytest.approx(
            second.cert.not_valid_after_utc.timestamp()
        )
        assert re.search(r"TLS certificate reloaded: CN=warmpod-2, serial [0-9a-f]+, valid until", server.log())


def test_a_bad_reload_keeps_the_old_certificate_counts_and_logs(
    store: Path, ca: CertificateAuthority, tmp_path: Path
) -> None:
    good, other, fresh = ca.server("warmpod-good"), ca.server("warmpod-other"), ca.server("warmpod-fresh")
    expired = ca.server("warmpod-expired", not_before=now() - 3 * HOUR, not_after=now() - HOUR)
    volume = ProjectedVolume(tmp_path / "tls", {"tls.crt": good.cert_pem, "tls.key": good.key_pem})
    trust = client_context(ca)
    with tls_server(store, volume.path("tls.crt"), volume.path("tls.key"), trust, log_dir=tmp_path) as server:
        metrics = metrics_url(server)

        def errors() -> float:
            return Scrape(metrics).value("warmpod_tls_reload_errors_total") or 0.0

        steps = [
            ({"tls.crt": other.cert_pem, "tls.key": good.key_pem}, "does not match --tls-cert"),
            ({"tls.crt": expired.cert_pem, "tls.key": expired.key_pem}, "CN=warmpod-expired expired at"),
            ({"tls.crt": good.cert_pem[: len(good.cert_pem) // 2], "tls.key": good.key_pem}, "does not parse"),
            ({"tls.crt": b"", "tls.key": good.key_pem}, "no PEM certificate in it"),
        ]
        for count, (files, reason) in enumerate(steps, start=1):
            volume.update(files)
            wait_until(lambda n=count: errors() >= n, timeout=10, what=f"reload error {count}")  # type: ignore[misc]
            assert errors() == count
            assert presented(server.port, trust) == good.fingerprint
            assert http("GET", server.url + "/v2/health/ready", context=trust)[0] == 200
            failed = [ln for ln in server.log().splitlines() if "TLS certificate reload failed" in ln]
            assert len(failed) == count and reason in failed[-1], failed
            assert "still serving CN=warmpod-good" in failed[-1]
        # A file rewritten in place (not swapped), half-written at first: refused, then taken once complete.
        with open(volume.path("tls.crt"), "wb") as f:
            f.write(fresh.cert_pem[:100])
            f.flush()
            wait_until(lambda: errors() >= len(steps) + 1, timeout=10, what="the half-written file refused")
        volume.update({"tls.crt": fresh.cert_pem, "tls.key": fresh.key_pem})
        wait_until(lambda: presented(server.port, trust) == fresh.fingerprint, timeout=10, what="the fresh one")
        scrape = Scrape(metrics)
        assert scrape.value("warmpod_tls_reloads_total") == 1
        assert scrape.value("warmpod_tls_reload_errors_total") == len(steps) + 1


# ------------------------------------------------------------------------------------------ in process


def test_reload_outcomes_in_process(ca: CertificateAuthority, tmp_path: Path) -> None:
    first, second = ca.server("one"), ca.server("two")
    volume = ProjectedVolume(tmp_path / "tls", {"tls.crt": first.cert_pem, "tls.key": first.key_pem})
    tls = ServerTls.load(TlsFiles(volume.path("tls.crt"), volume.path("tls.key")))
    metrics = tls.attach(CollectorRegistry())
    assert tls.reload_if_changed() is Reload.UNCHANGED
    volume.update({"tls.crt": second.cert_pem, "tls.key": first.key_pem})
    assert tls.reload_if_changed() is Reload.FAILED
    assert tls.reload_if_changed() is Reload.UNCHANGED  # the same bad files are not tried again
    assert tls.current.info.subject == "CN=one"
    # Judged at a given time: valid now, expired a day and a half later.
    volume.update({"tls.crt": second.cert_pem, "tls.key": second.key_pem})
    assert tls.reload_if_changed(now() + 36 * HOUR) is Reload.FAILED
    volume.update({"tls.crt": second.cert_pem, "tls.key": second.key_pem})
    assert tls.reload_if_changed() is Reload.RELOADED
    assert tls.current.info.subject == "CN=two"
    (volume.root / "..data").unlink()  # the files vanish: an error once, the old certificate stays
    assert tls.reload_if_changed() is Reload.FAILED
    assert tls.reload_if_changed() is Reload.UNCHANGED
    assert metrics.reloads._value.get() == 1 and metrics.reload_errors._value.get() == 3


@pytest.mark.parametrize(
    ("cert", "key", "client_ca", "message"),
    [
        (None, None, None, None),
        (Path("c"), None, None, "--tls-cert needs --tls-key"),
        (None, Path("k"), None, "--tls-key needs --tls-cert"),
        (None, None, Path("ca"), "--tls-client-ca needs --tls-cert and --tls-key"),
    ],
)
def test_flag_combinations(cert: Path | None, key: Path | None, client_ca: Path | None, message: str | None) -> None:
    if message is None:
        assert tls_files(cert, key, client_ca) is None
    else:
        with pytest.raises(TlsError, match=re.escape(message)):
            tls_files(cert, key, client_ca)


# ------------------------------------------------------------------------------------------ bad files at start


@pytest.fixture(scope="module")
def bad_files(ca: CertificateAuthority, other_ca: CertificateAuthority,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # fmt: skip
    d = tmp_path_factory.mktemp("bad")
    good_cert, good_key = ca.server().write(d, "good")
    _, other_key = ca.server().write(d, "other")
    expired = ca.server(not_before=now() - 3 * HOUR, not_after=now() - HOUR).write(d, "expired")
    future = ca.server(not_before=now() + HOUR, not_after=now() + 3 * HOUR).write(d, "future")
    (d / "garbage.pem").write_text("this is not PEM\n")
    (d / "half.pem").write_bytes(good_cert.read_bytes()[:200])
    (d / "empty.pem").write_bytes(b"")
    (d / "a-directory").mkdir()
    encrypted = ca.server().key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    (d / "encrypted.key").write_bytes(encrypted)
    return {"cert": good_cert, "key": good_key, "other_key": other_key, "expired": expired[0],
            "expired_key": expired[1], "future": future[0], "future_key": future[1], "garbage": d / "garbage.pem",
            "half": d / "half.pem", "empty": d / "empty.pem", "missing": d / "missing.pem", "dir": d / "a-directory",
            "encrypted": d / "encrypted.key", "ca": other_ca.write(d / "ca.pem")}  # fmt: skip


BAD_STARTS = [
    (("--tls-cert", "cert"), "--tls-cert needs --tls-key"),
    (("--tls-key", "key"), "--tls-key needs --tls-cert"),
    (("--tls-client-ca", "ca"), "--tls-client-ca needs --tls-cert and --tls-key"),
    (("--tls-cert", "missing", "--tls-key", "key"), "missing.pem: cannot read it: no such file"),
    (("--tls-cert", "cert", "--tls-key", "dir"), "a-directory: cannot read it: it is not a regular file"),
    (("--tls-cert", "garbage", "--tls-key", "key"), "garbage.pem: no PEM certificate in it"),
    (("--tls-cert", "empty", "--tls-key", "key"), "empty.pem: no PEM certificate in it"),
    (("--tls-cert", "half", "--tls-key", "key"), "half.pem: a PEM certificate that does not parse"),
    (("--tls-cert", "cert", "--tls-key", "garbage"), "garbage.pem: no PEM private key in it"),
    (("--tls-cert", "cert", "--tls-key", "encrypted"), "the private key is encrypted"),
    (("--tls-cert", "cert", "--tls-key", "other_key"), "other.key does not match --tls-cert"),
    (("--tls-cert", "expired", "--tls-key", "expired_key"), "expired at"),
    (("--tls-cert", "future", "--tls-key", "future_key"), "is not valid before"),
    (("--tls-cert", "cert", "--tls-key", "key", "--tls-client-ca", "garbage"), "--tls-client-ca"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_STARTS, ids=[m for _, m in BAD_STARTS])
def test_bad_tls_files_at_start_exit_2(
    bad_files: dict[str, Path], tmp_path: Path, flags: tuple[str, ...], message: str
) -> None:
    args = [a if a.startswith("--") else str(bad_files[a]) for a in flags]
    proc = run_warmpod("serve", "--model", "mlp", "--store", tmp_path, "--port", "0", *args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert message in error_line(proc, "warmpod serve")
