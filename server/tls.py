"""TLS and mutual TLS for the public site: the certificate files checked (at start and at each reload), the
`ssl.SSLContext` built from them, and the rotation that re-reads them when they change, with no dropped connection.

FORMAT. `--tls-cert` is PEM: the server's certificate first, then any intermediates (the chain the client needs up
to its trusted root). `--tls-key` is its PEM private key, unencrypted (PKCS#8, PKCS#1 or SEC1). `--tls-client-ca`
is PEM, one or more CA certificates: with it, every client MUST present a certificate signed by one of them, and
its subject's common name becomes the request's tenant (`warmpod.server.tenancy.certificate_tenant`). A certificate
and key MUST match, and every certificate of the chain MUST be valid now.

ROTATION. The site is given one context for its lifetime; its SNI callback (which OpenSSL calls on every handshake,
with or without SNI) hands each new handshake the newest good context. A connection keeps the certificate it
shook hands with; nothing in flight is touched. The files are polled (stat following symlinks: a Secret or a
`podCertificate` projected volume rotates by swapping a `..data` symlink); a change that does not make a good
certificate (half-written, mismatched, expired) keeps the old one, logs why and counts an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import ssl
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from prometheus_client import CollectorRegistry, Counter, Gauge

from warmpod.errors import UsageError

log = logging.getLogger("warmpod.server.tls")

POLL_INTERVAL_S = 1.0  # how often the files are checked for a change
START_ATTEMPTS = 3  # reads at start while the files keep changing under it (a rotation at that very moment)


class TlsError(UsageError):
    """Certificate files that cannot be served: at start the server exits 2 with this message; at a reload the old
    certificate stays and the message is logged."""


# ------------------------------------------------------------------------------------------ the core


@dataclass(frozen=True)
class TlsFiles:
    """Where the certificate, its key and (mutual TLS) the client CAs are."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @property
    def named(self) -> tuple[tuple[str, Path], ...]:
        """(flag, path) of each file."""
        both = (("--tls-cert", self.cert), ("--tls-key", self.key))
        return both if self.client_ca is None else (*both, ("--tls-client-ca", self.client_ca))


def tls_files(cert: Path | None, key: Path | None, client_ca: Path | None) -> TlsFiles | None:
    """The TLS files the flags name (None: plain HTTP), or a TlsError for a combination that cannot work."""
    if cert is None and key is None:
        if client_ca is not None:
            raise TlsError("--tls-client-ca needs --tls-cert and --tls-key: mutual TLS runs over TLS")
        return None
    if key is None:
        raise TlsError("--tls-cert needs --tls-key (the certificate's private key, PEM)")
    if cert is None:
        raise TlsError("--tls-key needs --tls-cert (the certificate, PEM, its chain after it)")
    return TlsFiles(cert, key, client_ca)


@dataclass(frozen=True)
class CertificateInfo:
    """What the logs and metrics say about the certificate being served."""

    subject: str
    serial: int
    not_after: datetime.datetime

    def __str__(self) -> str:
        return f"{self.subject}, serial {self.serial:x}, valid until {_iso(self.not_after)}"


def parse_certificates(data: bytes, flag: str, path: Path) -> list[x509.Certificate]:
    """The PEM certificates in `data` (the file `flag` names), in order; a TlsError saying what is wrong."""
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TlsError(f"{flag} {path}: no PEM certificate in it (expected a -----BEGIN CERTIFICATE----- block)")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TlsError(f"{flag} {path}: a PEM certificate that does not parse (half-written or damaged?): {e}") from e


def parse_private_key(data: bytes, path: Path) -> PrivateKeyTypes:
    if b"PRIVATE KEY-----" not in data:
        raise TlsError(f"--tls-key {path}: no PEM private key in it (expected a -----BEGIN PRIVATE KEY----- block)")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError as e:  # encrypted: there is no passphrase to give
        raise TlsError(f"--tls-key {path}: the private key is encrypted; give it unencrypted (mode 0600)") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise TlsError(
            f"--tls-key {path}: a PEM private key that does not parse (half-written or damaged?): {e}"
        ) from e


def check_certificate(chain: list[x509.Certificate], key: PrivateKeyTypes, files: TlsFiles,
                      now: datetime.datetime) -> CertificateInfo:  # fmt: skip
    """The served certificate's summary, once the key is its key and every certificate of the chain is valid at
    `now`; else a TlsError naming the rule broken."""
    leaf = chain[0]
    if _public_der(leaf.public_key()) != _public_der(key.public_key()):
        raise TlsError(
            f"--tls-key {files.key} does not match --tls-cert {files.cert} ({_subject(leaf)}): the certificate's "
            "public key is not this key's; give the key the certificate was issued for"
        )
    for cert in chain:
        what = f"--tls-cert {files.cert}: the certificate {_subject(cert)}"
        if now < cert.not_valid_before_utc:
            raise TlsError(f"{what} is not valid before {_iso(cert.not_valid_before_utc)} (now {_iso(now)}); check "
                           "the clock or the certificate")  # fmt: skip
        if now > cert.not_valid_after_utc:
            raise TlsError(f"{what} expired at {_iso(cert.not_valid_after_utc)} (now {_iso(now)}); renew it")
    return CertificateInfo(_subject(leaf), leaf.serial_number, leaf.not_valid_after_utc)


def _public_der(key: object) -> bytes:
    public_bytes = getattr(key, "public_bytes", None)
    if public_bytes is None:  # a key type without a public encoding: never equal to anything
        return b""
    der: bytes = public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def _iso(when: datetime.datetime) -> str:
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


FileState = tuple[tuple[int, int, int, int], ...]  # per file: device, inode, size, mtime_ns


# ------------------------------------------------------------------------------------------ the shell


def file_state(files: TlsFiles) -> FileState:
    """What tells a changed file apart, symlinks followed (a projected volume swaps `..data`); OSError if missing."""
    stats = [os.stat(path) for _, path in files.named]
    return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


def _state_or_none(files: TlsFiles) -> FileState | None:
    try:
        return file_state(files)
    except OSError:
        return None


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TlsError(f"{flag} {path}: cannot read it: {e.strerror or e}") from e


@dataclass(frozen=True)
class Loaded:
    context: ssl.SSLContext
    info: CertificateInfo
    state: FileState


class FilesChanging(Exception):
    """The files changed while they were read: read them again (not an error; a rotation is under way)."""


def load_context(files: TlsFiles, now: datetime.datetime) -> Loaded:
    """A fresh server context from the files, checked first (TlsError), or FilesChanging."""
    for flag, path in files.named:
        if not path.is_file():
            why = "it is not a regular file" if path.exists() else "no such file"
            raise TlsError(f"{flag} {path}: cannot read it: {why}")
    try:
        before = file_state(files)
    except OSError as e:  # removed this instant
        raise FilesChanging(str(e)) from e
    chain = parse_certificates(_read(files.cert, "--tls-cert"), "--tls-cert", files.cert)
    key = parse_private_key(_read(files.key, "--tls-key"), files.key)
    info = check_certificate(chain, key, files, now)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        # ssl reads certificates from paths only: the files are read again, and the state check below says whether
        # they are still the ones just checked.
        context.load_cert_chain(files.cert, files.key)
    except (ssl.SSLError, OSError) as e:
        raise TlsError(f"--tls-cert {files.cert} with --tls-key {files.key}: OpenSSL refused them: {e}") from e
    if files.client_ca is not None:
        ca_data = _read(files.client_ca, "--tls-client-ca")
        authorities = parse_certificates(ca_data, "--tls-client-ca", files.client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata="".join(
            c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in authorities
        ))  # fmt: skip
    try:
        after = file_state(files)
    except OSError as e:
        raise FilesChanging(str(e)) from e
    if after != before:
        raise FilesChanging("the files changed while they were read")
    return Loaded(context, info, after)


class TlsMetrics:
    """The reload counters and the expiry gauge, on the server's registry (only where TLS is on)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.reloads = Counter(
            "warmpod_tls_reloads", "Certificate changes taken (new handshakes present the new certificate)",
            registry=registry,
        )  # fmt: skip
        self.reload_errors = Counter(
            "warmpod_tls_reload_errors",
            "Certificate changes refused (unreadable, not PEM, mismatched key, expired): the old one is still served",
            registry=registry,
        )
        self.expiry = Gauge(
            "warmpod_tls_certificate_expiry_timestamp_seconds",
            "When the certificate being served expires (Unix time): alert well before it",
            registry=registry,
        )


class Reload(Enum):
    UNCHANGED = "unchanged"
    RELOADED = "reloaded"
    FAILED = "failed"
    CHANGING = "changing"


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class ServerTls:
    """The public site's TLS: `context` is handed to the site once; each handshake is switched to the newest good
    context (`current`), so a reload reaches every new connection and leaves the ones already open alone."""

    def __init__(self, files: TlsFiles, loaded: Loaded) -> None:
        self.files = files
        self.current = loaded
        self._seen: FileState | None = loaded.state  # the file state last acted on, good or bad (None: missing)
        self.context = loaded.context  # the site's; its SNI callback serves `current`
        self.context.sni_callback = self._select
        self.metrics: TlsMetrics | None = None

    @classmethod
    def load(cls, files: TlsFiles, now: datetime.datetime | None = None) -> ServerTls:
        """Checked and loaded, or TlsError (the server exits 2)."""
        for _ in range(START_ATTEMPTS):
            with contextlib.suppress(FilesChanging):
                return cls(files, load_context(files, now or _utcnow()))
        raise TlsError(f"--tls-cert {files.cert}: the files kept changing while being read; try again")

    def _select(self, sslobj: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        if sslobj.context is not self.current.context:
            sslobj.context = self.current.context

    def attach(self, registry: CollectorRegistry) -> TlsMetrics:
        self.metrics = TlsMetrics(registry)
        self.metrics.expiry.set(self.current.info.not_after.timestamp())
        return self.metrics

    def describe(self) -> str:
        ca = self.files.client_ca
        mutual = f"; client certificates required, from the CAs in {ca}" if ca else ""
        return f"TLS certificate {self.current.info}{mutual}"

    def reload_if_changed(self, now: datetime.datetime | None = None) -> Reload:
        """Take the files if they changed since last seen; a change that fails keeps the old certificate and is not
        tried again until the files change again."""
        state = _state_or_none(self.files)
        if state == self._seen:
            return Reload.UNCHANGED
        try:
            loaded = load_context(self.files, now or _utcnow())
        except FilesChanging:
            return Reload.CHANGING
        except TlsError as e:
            self._seen = state
            log.error("TLS certificate reload failed, still serving %s: %s", self.current.info, e)
            if self.metrics is not None:
                self.metrics.reload_errors.inc()
            return Reload.FAILED
        self.current, self._seen = loaded, loaded.state
        log.info("TLS certificate reloaded: %s", loaded.info)
        if self.metrics is not None:
            self.metrics.reloads.inc()
            self.metrics.expiry.set(loaded.info.not_after.timestamp())
        return Reload.RELOADED

    async def watch(self, interval_s: float = POLL_INTERVAL_S) -> None:
        """Poll the files until cancelled (a task of `warmpod serve`)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.reload_if_changed()
            except Exception:  # a bug here must not end the rotation: say so, count it, keep polling
                log.exception("TLS certificate reload failed unexpectedly, still serving %s", self.current.info)
                if self.metrics is not None:
                    self.metrics.reload_errors.inc()
