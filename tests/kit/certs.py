"""Certificates for the TLS tests, made with `cryptography`: a CA (and an intermediate under it) issuing server and
client certificates, PEM files written where a test wants them, a mounted volume that rotates them the way the kubelet
does, and the client side (an ssl context that trusts a CA, the certificate a handshake presents)."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import shutil
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOUR = datetime.timedelta(hours=1)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key (the chain up to, not including, the root follows the certificate)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def cert_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.cert, *self.chain))

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def bundle_pem(self) -> bytes:
        """The key, then the certificate and its chain, in one file: a `podCertificate` volume's credential bundle."""
        return self.key_pem + self.cert_pem

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the certificate's DER: what `presented()` returns for a handshake that presents it."""
        return hashlib.sha256(self.cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """NAME.pem (the certificate and its chain) and NAME.key in `directory`, created if missing."""
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / f"{name}.pem", directory / f"{name}.key"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        key.chmod(0o600)
        return cert, key


class CertificateAuthority:
    """A CA that signs server certificates (for 127.0.0.1 and localhost) and client certificates (CN = tenant)."""

    def __init__(self, name: str, *, parent: CertificateAuthority | None = None) -> None:
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.parent = parent
        issuer_key = parent.key if parent else self.key
        issuer_name = parent.cert.subject if parent else _name(name)
        usage = x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                              key_encipherment=False, data_encipherment=False, key_agreement=False,
                              encipher_only=False, decipher_only=False)  # fmt: skip
        builder = (
            _builder(_name(name), issuer_name, self.key, _now() - HOUR, _now() + 24 * HOUR)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(usage, critical=True)
        )
        self.cert = builder.sign(issuer_key, hashes.SHA256())

    def intermediate(self, name: str) -> CertificateAuthority:
        return CertificateAuthority(name, parent=self)

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """The certificates a leaf of this CA sends after itself: this CA and its parents, the root excluded."""
        return (self.cert, *self.parent.chain) if self.parent else ()

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.pem)
        return path

    def server(self, name: str = "warmpod", *, not_before: datetime.datetime | None = None,
               not_after: datetime.datetime | None = None) -> Issued:  # fmt: skip
        """A server certificate for 127.0.0.1 and localhost, valid from an hour ago for a day unless told."""
        return self._issue(name, ExtendedKeyUsageOID.SERVER_AUTH, not_before, not_after, server=True)

    def client(self, tenant: str) -> Issued:
        """A client certificate whose subject's common name is `tenant`."""
        return self._issue(tenant, ExtendedKeyUsageOID.CLIENT_AUTH, None, None, server=False)

    def _issue(self, name: str, usage: x509.ObjectIdentifier, not_before: datetime.datetime | None,
               not_after: datetime.datetime | None, *, server: bool) -> Issued:  # fmt: skip
        key = ec.generate_private_key(ec.SECP256R1())
        start, end = not_before or _now() - HOUR, not_after or _now() + 24 * HOUR
        builder = (
            _builder(_name(name), self.cert.subject, key, start, end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return Issued(builder.sign(self.key, hashes.SHA256()), key, (*self.chain,))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, start: datetime.datetime,
             end: datetime.datetime) -> x509.CertificateBuilder:  # fmt: skip
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )


class ProjectedVolume:
    """A directory that holds files the way the kubelet writes a Secret or `podCertificate` projected volume:
    `NAME -> ..data/NAME`, `..data -> ..<timestamp>/`; `update` writes a new timestamped directory and swaps `..data`
    in one rename (what a server sees mid-rotation: the old files or the new ones, never half of each)."""

    def __init__(self, root: Path, files: dict[str, bytes]) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._generation = 0
        self.update(files)
        for name in files:
            (root / name).symlink_to(Path("..data") / name)

    def path(self, name: str) -> Path:
        return self.root / name

    def update(self, files: dict[str, bytes]) -> None:
        self._generation += 1
        old = (self.root / "..data").resolve() if (self.root / "..data").is_symlink() else None
        stamp = f"..{_now():%Y_%m_%d_%H_%M_%S}.{os.getpid()}_{self._generation}"
        target = self.root / stamp
        target.mkdir(mode=0o755)
        for name, data in files.items():
            (target / name).write_bytes(data)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(stamp)
        tmp.rename(self.root / "..data")
        if old is not None:
            shutil.rmtree(old)


def client_context(ca: CertificateAuthority | None, client: Issued | None = None, *, directory: Path | None = None,
                   tls_max: ssl.TLSVersion | None = None) -> ssl.SSLContext:  # fmt: skip
    """A client context that trusts `ca` (None: nothing but the system's store) and presents `client`, if given
    (written to `directory` first: ssl loads a certificate from files only)."""
    context = ssl.create_default_context(cadata=ca.pem.decode() if ca else None)
    if client is not None:
        assert directory is not None, "a client certificate needs a directory to be written to"
        context.load_cert_chain(*client.write(directory, f"client-{client.fingerprint[:12]}"))
    if tls_max is not None:
        context.maximum_version = tls_max
    return context


def presented(port: int, context: ssl.SSLContext, server_name: str = "127.0.0.1", timeout: float = 10) -> str:
    """One new handshake with 127.0.0.1:PORT, verified as `server_name` (an IP address sends no SNI, as curl to an
    address does; "localhost" sends SNI): the SHA-256 fingerprint of the certificate the server presented."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock,
        context.wrap_socket(sock, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()
