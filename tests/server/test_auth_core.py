"""The door's pure core and the audit log's, without a server: the key file's rules (each broken one named by its
line, never with the key), the Bearer header's shapes, who is admitted as which tenant on which site, the
exposure rule, constant-time lookup, the reload of a key file swapped as a Secret is, and the audit line."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tests.kit.certs import ProjectedVolume
from warmpod.server.audit import AuditFacts, AuditLog, audit_record, audited, request_id, rfc3339
from warmpod.server.auth import (
    AuthError,
    Door,
    KeyTable,
    Site,
    admit,
    exposure_problem,
    is_loopback,
    parse_bearer,
    parse_key_file,
    read_key_file,
)
from warmpod.server.errors import Unauthorized
from warmpod.server.tenancy import ANONYMOUS

KEY_A1, KEY_A2, KEY_B = "sk-team-a-0000000001", "sk-team-a-0000000002", "sk-team-b-0000000003"
KEYS = f"# tenants\n\nteam-a:{KEY_A1}\n  team-a : {KEY_A2}  \nteam_b.x:{KEY_B}\n"


# ------------------------------------------------------------------------------------------ the key file


def test_key_file_tenants_several_keys_comments_and_blank_lines() -> None:
    table = parse_key_file(KEYS, "keys")
    assert table.tenants == {"team-a", "team_b.x"}
    assert len(table.entries) == 3
    assert table.lookup(KEY_A1) == "team-a"
    assert table.lookup(KEY_A2) == "team-a"  # whitespace around tenant and key is not part of them
    assert table.lookup(KEY_B) == "team_b.x"
    assert table.lookup("sk-team-a-000000000") is None  # a prefix
    assert table.lookup(KEY_A1 + "x") is None
    assert table.lookup("") is None
    # A key may hold ':' (only the first one separates the tenant); the digests stored are not the keys.
    colon = parse_key_file("t:a:b\n", "keys")
    assert colon.lookup("a:b") == "t"
    assert all(b"a:b" not in digest for digest, _ in colon.entries)


def test_the_same_key_twice_for_one_tenant_is_kept_once() -> None:
    assert len(parse_key_file(f"a:{KEY_A1}\na:{KEY_A1}\n", "keys").entries) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "keys: no keys in it (expected TENANT:KEY lines)"),
        ("# only a comment\n\n   \n", "keys: no keys in it"),
        (f"a:{KEY_A1}\n{KEY_B}\n", "keys line 2: expected TENANT:KEY (no ':' on the line)"),
        (f":{KEY_A1}\n", "keys line 1: the tenant name must be 1 to 64 of A-Z a-z 0-9 . _ -"),
        (f"team a:{KEY_A1}\n", "keys line 1: the tenant name must be 1 to 64 of A-Z a-z 0-9 . _ -"),
        (f"{'t' * 65}:{KEY_A1}\n", "keys line 1: the tenant name must be 1 to 64"),
        (f"tenant/x:{KEY_A1}\n", "keys line 1: the tenant name must be"),
        ("\n\nteam-a:\n", "keys line 3: tenant 'team-a' has an empty key"),
        (f"team-a:{KEY_A1} {KEY_B}\n", "keys line 1: the key of tenant 'team-a' has whitespace or characters other "
         "than printable ASCII"),
        (f"team-a:{KEY_A1}é\n", "keys line 1: the key of tenant 'team-a' has whitespace"),
        (f"a:{KEY_A1}\n# x\nb:{KEY_A1}\n", "keys line 3: tenant 'b' has the same key as tenant 'a' on line 1; a key "
         "belongs to one tenant"),
    ],
)  # fmt: skip
def test_a_bad_key_file_names_the_line_and_never_the_key(text: str, message: str) -> None:
    with pytest.raises(AuthError) as raised:
        parse_key_file(text, "keys")
    assert str(raised.value).startswith(message), str(raised.value)
    for key in (KEY_A1, KEY_B):
        assert key not in str(raised.value)


def test_reading_a_key_file_that_is_missing_a_directory_not_utf8_or_huge(tmp_path: Path) -> None:
    cases = {
        tmp_path / "missing": "cannot read it: No such file or directory",
        tmp_path: "cannot read it: Is a directory",
    }
    (tmp_path / "latin1").write_bytes(b"caf\xe9:" + KEY_A1.encode())
    cases[tmp_path / "latin1"] = "not UTF-8 text (byte 3)"
    (tmp_path / "huge").write_bytes(b"#" * ((1 << 20) + 1))
    cases[tmp_path / "huge"] = "larger than 1 MiB; is this the key file?"
    for path, message in cases.items():
        with pytest.raises(AuthError) as raised:
            read_key_file(path)
        assert str(raised.value) == f"--api-key-file {path}: {message}"


# ------------------------------------------------------------------------------------------ the header


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("", "empty Authorization header"),
        ("Bearer", "Authorization: Bearer without a key"),
        ("bearer   ", "Authorization: Bearer without a key"),
        ("Basic dXNlcjpwYXNz", "malformed Authorization header: the Basic scheme is not supported"),
        (KEY_A1, "malformed Authorization header: it is not 'Bearer <key>'"),
        (f"Token {KEY_A1}", "malformed Authorization header: the Token scheme is not supported"),
        (f"Bearer\t{KEY_A1}", "malformed Authorization header: it is not 'Bearer <key>'"),
        (f"Bearer {KEY_A1} {KEY_B}", "malformed Authorization header: the Bearer key must be one word of printable"),
        ("Bearer clé", "malformed Authorization header: the Bearer key must be one word of printable ASCII"),
    ],
)
def test_malformed_authorization_is_invalid_request_and_never_echoes_the_key(header: str, message: str) -> None:
    with pytest.raises(Unauthorized) as raised:
        parse_bearer(header)
    text = str(raised.value)
    assert text.startswith(message), text
    assert text.endswith("send 'Authorization: Bearer <key>' with a key of the server's --api-key-file")
    assert raised.value.challenge == 'Bearer realm="warmpod", error="invalid_request"'
    assert KEY_A1 not in text and KEY_B not in text


def test_bearer_tokens() -> None:
    assert parse_bearer(None) is None
    assert parse_bearer(f"Bearer {KEY_A1}") == KEY_A1
    assert parse_bearer(f"bearer  {KEY_A1}") == KEY_A1  # the scheme is case-insensitive (RFC 7235)
    assert parse_bearer("BEARER a.b-c_d~e+f/g==") == "a.b-c_d~e+f/g=="


# ------------------------------------------------------------------------------------------ who is admitted


def _admit(route: str | None = "infer", *, path: str = "/v2/models/m/infer", site: Site = Site.PUBLIC,
           authorization: str | None = None, cert: str | None = None, keys: KeyTable | None = None,
           mutual_tls: bool = False) -> str | None:  # fmt: skip
    return admit(route=route, path=path, site=site, authorization=authorization, cert_tenant=cert, keys=keys,
                 mutual_tls=mutual_tls)  # fmt: skip


def _refused(**kwargs: object) -> Unauthorized:
    with pytest.raises(Unauthorized) as raised:
        _admit(**kwargs)  # type: ignore[arg-type]
    return raised.value


def test_without_a_door_everyone_is_anonymous_even_with_a_header() -> None:
    assert _admit() == ANONYMOUS
    assert _admit(authorization="Basic whatever") == ANONYMOUS
    assert _admit(None, path="/nowhere") == ANONYMOUS
    assert _admit(None, path="/metrics") == ANONYMOUS


def test_keys_name_the_tenant_and_everything_but_health_needs_one() -> None:
    keys = parse_key_file(KEYS, "keys")
    assert _admit(authorization=f"Bearer {KEY_B}", keys=keys) == "team_b.x"
    assert _admit("embeddings", path="/v1/embeddings", authorization=f"Bearer {KEY_A2}", keys=keys) == "team-a"
    for route in ("live", "ready"):  # probes
        assert _admit(route, path=f"/v2/health/{route}", keys=keys) is None
    missing = _refused(keys=keys)
    assert str(missing).startswith("missing API key: send 'Authorization: Bearer <key>'")
    assert missing.challenge == 'Bearer realm="warmpod"'  # RFC 6750: no error code when no credential was sent
    unknown = _refused(authorization="Bearer sk-not-a-key", keys=keys)
    assert str(unknown).startswith("unknown API key (revoked, mistyped or from another server)")
    assert unknown.challenge == 'Bearer realm="warmpod", error="invalid_token"'
    # Metadata, /metrics on the public port, unknown routes and the metrics site's inference routes: behind the key.
    for route, path, site in [("server_metadata", "/v2", Site.PUBLIC), (None, "/metrics", Site.PUBLIC),
                              (None, "/v2/nowhere", Site.PUBLIC), ("infer", "/v2/models/m/infer", Site.METRICS),
                              (None, "/openapi.json", Site.METRICS)]:  # fmt: skip
        assert str(_refused(route=route, path=path, site=site, keys=keys)).startswith("missing API key")
    assert _admit(None, path="/metrics", site=Site.METRICS, keys=keys) is None
    assert _admit(None, path="/metrics", authorization=f"Bearer {KEY_A1}", keys=keys) == "team-a"


def test_a_client_certificate_is_a_credential_and_a_key_with_it_must_agree() -> None:
    keys = parse_key_file(KEYS, "keys")
    assert _admit(cert="team-a", keys=keys, mutual_tls=True) == "team-a"
    assert _admit(cert="team-a", mutual_tls=True) == "team-a"
    assert _admit(cert="team-a", authorization="Bearer ignored-without-keys", mutual_tls=True) == "team-a"
    assert _admit(cert="team-a", authorization=f"Bearer {KEY_A2}", keys=keys, mutual_tls=True) == "team-a"
    mismatch = _refused(cert="team-a", authorization=f"Bearer {KEY_B}", keys=keys, mutual_tls=True)
    assert str(mismatch) == ("the API key belongs to tenant 'team_b.x', the client certificate to 'team-a': send a "
                             "key of the certificate's tenant, or none")  # fmt: skip
    unknown = _refused(cert="team-a", authorization="Bearer sk-nope", keys=keys, mutual_tls=True)
    assert str(unknown).startswith("unknown API key")
    # mTLS alone: the plain metrics site has no certificate to offer, so it serves health and /metrics only.
    assert _admit(None, path="/metrics", site=Site.METRICS, mutual_tls=True) is None
    plain = _refused(site=Site.METRICS, mutual_tls=True)
    assert str(plain).startswith("no client certificate: this port serves the health routes and /metrics only")
    assert _admit(site=Site.METRICS, authorization=f"Bearer {KEY_B}", keys=keys, mutual_tls=True) == "team_b.x"


def test_lookup_compares_every_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Constant time: the presented key's digest is compared with every stored one, found first or last or not."""
    keys = parse_key_file("\n".join(f"t{i}:key-{i:04d}" for i in range(50)), "keys")
    import warmpod.server.auth as auth

    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for key, tenant in (("key-0000", "t0"), ("key-0049", "t49"), ("nope", None)):
        calls.clear()
        assert keys.lookup(key) == tenant
        assert len(calls) == 50
        assert all(len(a) == len(b) == 32 for a, b in calls)  # digests, never the keys themselves


# ------------------------------------------------------------------------------------------ exposure


def test_loopback_addresses() -> None:
    for host in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "", "10.0.0.5", "example.com", "localhost.example"):
        assert not is_loopback(host), host


def test_key_less_on_another_address_is_refused_unless_allowed() -> None:
    assert exposure_problem("127.0.0.1", None, door=False, allow_unauthenticated=False) is None
    assert exposure_problem("127.0.0.1", "127.0.0.1", door=False, allow_unauthenticated=False) is None
    problem = exposure_problem("0.0.0.0", None, door=False, allow_unauthenticated=False)
    assert problem == ("--host 0.0.0.0 is reachable from other machines and no client needs a key: give "
                       "--api-key-file (or --tls-client-ca), or --allow-unauthenticated to serve anyone who reaches "
                       "it")  # fmt: skip
    metrics = exposure_problem("127.0.0.1", "0.0.0.0", door=False, allow_unauthenticated=False)
    assert metrics is not None and metrics.startswith("--metrics-host 0.0.0.0 is reachable")
    assert "--host (all addresses)" in str(exposure_problem("", None, door=False, allow_unauthenticated=False))
    assert exposure_problem("0.0.0.0", "0.0.0.0", door=True, allow_unauthenticated=False) is None
    assert exposure_problem("0.0.0.0", "0.0.0.0", door=False, allow_unauthenticated=True) is None


# ------------------------------------------------------------------------------------------ reload


def _door(volume: ProjectedVolume) -> tuple[Door, CollectorRegistry]:
    registry = CollectorRegistry()
    door = Door.load(volume.path("keys"))
    door.attach(registry)
    return door, registry


def _count(registry: CollectorRegistry, name: str) -> float:
    value = registry.get_sample_value(name)
    assert value is not None
    return value


def test_a_secret_swap_is_taken_and_a_bad_one_keeps_the_old_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                                  ) -> None:  # fmt: skip
    volume = ProjectedVolume(tmp_path / "secret", {"keys": f"a:{KEY_A1}\nb:{KEY_B}\n".encode()})
    door, registry = _door(volume)
    assert door.reload_if_changed() is None  # unchanged
    volume.update({"keys": f"a:{KEY_A1}\na:{KEY_A2}\n".encode()})  # b revoked, a second key for a
    assert door.reload_if_changed() is True
    assert door.keys is not None
    assert (door.keys.lookup(KEY_A2), door.keys.lookup(KEY_B)) == ("a", None)
    assert _count(registry, "warmpod_auth_reloads_total") == 1
    assert _count(registry, "warmpod_auth_keys") == 2
    for bad, why in ((b"", "no keys in it"), (f"a {KEY_B}\n".encode(), "line 1: expected TENANT:KEY")):
        caplog.clear()
        volume.update({"keys": bad})
        assert door.reload_if_changed() is False
        assert door.reload_if_changed() is None  # not tried again until it changes again
        assert door.keys.lookup(KEY_A2) == "a"
        assert f"API key file reload failed, keeping the 2 key(s) loaded before: --api-key-file {volume.path('keys')}" \
               in caplog.text and why in caplog.text  # fmt: skip
        assert KEY_B not in caplog.text
    assert _count(registry, "warmpod_auth_reload_errors_total") == 2
    os.unlink(volume.path("keys"))  # removed: an error, the keys stay
    assert door.reload_if_changed() is False
    assert door.keys.lookup(KEY_A1) == "a"
    assert _count(registry, "warmpod_auth_reload_errors_total") == 3
    assert _count(registry, "warmpod_auth_reloads_total") == 1


# ------------------------------------------------------------------------------------------ the audit log


def test_request_ids_are_the_clients_when_sane() -> None:
    assert request_id("req-1.2:3@x/y+z=", lambda: "made") == "req-1.2:3@x/y+z="
    for bad in (None, "", "has space", "a\nb", "x" * 129, "é"):
        assert request_id(bad, lambda: "made") == "made"
    assert len(request_id(None)) == 32


def test_audit_lines() -> None:
    assert rfc3339(1767225600.1234) == "2026-01-01T00:00:00.123Z"
    record = audit_record(at=1767225600.0, request_id="r1", tenant="team-a", method="POST",
                          path="/v2/models/m/infer" + "x" * 300, facts=AuditFacts("m", "3", 4), status=200,
                          latency_s=0.0123456, reason=None, client="127.0.0.1")  # fmt: skip
    assert record == {"time": "2026-01-01T00:00:00.000Z", "request_id": "r1", "tenant": "team-a", "model": "m",
                      "version": "3", "method": "POST", "route": ("/v2/models/m/infer" + "x" * 300)[:256], "rows": 4,
                      "status": 200, "reason": None, "latency_ms": 12.346, "client": "127.0.0.1"}  # fmt: skip
    assert audited("infer_version", 503, ("infer", "embeddings"))
    assert audited("server_metadata", 401, ("infer", "embeddings"))
    assert not audited("server_metadata", 200, ("infer", "embeddings"))
    assert not audited(None, 404, ("infer", "embeddings"))


class _Broken(io.StringIO):
    def write(self, s: str) -> int:
        raise OSError(28, "No space left on device")


def test_a_failing_audit_write_is_counted_and_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    broken = AuditLog(_Broken(), "audit.log", owned=False)
    broken.attach(registry)
    for _ in range(3):
        broken.write({"status": 200})
    assert registry.get_sample_value("warmpod_audit_write_errors_total") == 3
    assert caplog.text.count("cannot write the audit log audit.log (lines are being lost)") == 1  # not once a line
    good = io.StringIO()
    AuditLog(good, "mem", owned=False).write({"tenant": "a", "status": 200})
    assert json.loads(good.getvalue()) == {"tenant": "a", "status": 200}


def test_an_audit_log_that_cannot_be_opened(tmp_path: Path) -> None:
    from warmpod.server.audit import AuditError

    with pytest.raises(AuditError) as raised:
        AuditLog.open(str(tmp_path / "no" / "audit.log"))
    assert str(raised.value) == f"--audit-log {tmp_path}/no/audit.log: cannot open it for appending: No such file or " \
                                "directory"  # fmt: skip
