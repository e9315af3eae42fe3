"""`warmpod load` from gs:// and az:// against real emulators on 127.0.0.1: gcp-storage-emulator and Azurite.

Each emulator runs in its own process on a free port (`.ci/install-emulators.sh` installs both). Models are
uploaded with each vendor's own SDK (google-cloud-storage, azure-storage-blob) and read back by the real CLI
through gcsfs and adlfs, which get nothing but each backend's standard environment:

- GCS: `STORAGE_EMULATOR_HOST` (an emulator is reached anonymously, as google-cloud-storage does), plus
  `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`: otherwise gcsfs asks a gRPC control API that emulators lack
  for each bucket's layout, retrying for 60 s per call.
- Azure: `AZURE_STORAGE_CONNECTION_STRING`, for an account and key made up per run (`AZURITE_ACCOUNTS`).
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from tests.kit.models import tree_digests, write_model_dir
from tests.kit.procs import LOOPBACK, ChildProcess, free_port
from tests.kit.warmpod import error_line, result_json, run_load

REPO = Path(__file__).resolve().parents[2]
AZURITE_BLOB = REPO / ".ci" / "node" / "node_modules" / ".bin" / "azurite-blob"
INSTALL_HINT = "run .ci/install-emulators.sh"
STARTUP_TIMEOUT_S = 30.0
# Small chunks, so each shard is read in several ranged requests. gcp-storage-emulator serves one connection
# at a time with a listen backlog of 5: more requests in flight only wait for SYN retransmits (1 s each).
LOAD_ARGS = ("--chunk-size", "16KiB", "--concurrency", "4")
# Configuration that could leak in from the machine running the tests; each test sets only what it means to.
AMBIENT_PREFIXES = ("AZURE_", "GOOGLE_", "GCE_", "CLOUDSDK_", "STORAGE_EMULATOR_HOST", "FSSPEC_", "GCSFS_")

# The gcs/azurite fixtures are this module's own emulators, which tests/conftest.py does not know by name.
pytestmark = pytest.mark.emulator


def emulator(
    name: str, argv: list[str], workdir: Path, ready_url: str, env: dict[str, str] | None = None
) -> ChildProcess:
    """An emulator in its own process group, logging into `workdir`, ready once anything answers HTTP at `ready_url`."""
    return ChildProcess(argv, name=name, log_path=workdir / f"{name}.log", ready=lambda: answers_http(ready_url),
                        env={**os.environ, **(env or {})}, cwd=workdir, stop_timeout=10, own_group=True)  # fmt: skip


def answers_http(url: str) -> bool:
    """True once anything answers HTTP at `url`, whatever the status (an unsigned GET may be refused)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


class ObjectStore(Protocol):
    """What the tests need from an emulated object store."""

    scheme: str

    def env(self) -> dict[str, str]: ...

    def upload_dir(self, local: Path, container: str, prefix: str) -> str: ...


class GcsEmulator:
    """gcp-storage-emulator on 127.0.0.1, plus a trap where the GCE metadata server would be.

    The trap is a listening socket that accepts nothing: a client looking for credentials on the metadata
    server connects into its backlog, so `credential_probes()` counts what reached it.
    """

    scheme = "gs"

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        argv = [sys.executable, "-m", "gcp_storage_emulator", "start", "--in-memory"]
        argv += ["--host", LOOPBACK, "--port", str(self.port)]
        self.process = emulator("gcp-storage-emulator", argv, workdir, self.url + "/")
        self.gcloud_config = workdir / "gcloud"  # empty: no gcloud application-default credentials
        self.gcloud_config.mkdir()
        self.trap = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.trap.bind((LOOPBACK, 0))
        self.trap.listen(16)
        self.trap.setblocking(False)

    def start(self) -> None:
        self.process.start(timeout=STARTUP_TIMEOUT_S)

    def stop(self) -> None:
        self.process.stop()
        self.trap.close()

    def env(self) -> dict[str, str]:
        trap = f"{LOOPBACK}:{self.trap.getsockname()[1]}"
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            # Should a credential lookup happen after all, it stays on 127.0.0.1 and fails fast.
            "GCE_METADATA_HOST": trap,
            "GCE_METADATA_IP": trap,
            "GCE_METADATA_TIMEOUT": "1",
            "CLOUDSDK_CONFIG": str(self.gcloud_config),
        }

    def credential_probes(self) -> int:
        """Connections that reached the metadata trap since the last call."""
        count = 0
        while True:
            try:
                conn, _ = self.trap.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1

    def upload_dir(self, local: Path, container: str, prefix: str) -> str:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage  # type: ignore[import-untyped]

        client = storage.Client(
            project="warmpod-test",
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options={"api_endpoint": self.url},
        )
        bucket = client.lookup_bucket(container) or client.create_bucket(container)
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            bucket.blob(f"{prefix}/{path.relative_to(local)}").upload_from_filename(str(path))
        return f"gs://{container}/{prefix}"


class Azurite:
    """Azurite's Blob service on 127.0.0.1, serving one account whose key is made up for this run."""

    scheme = "az"
    account = "warmpodtest"

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}/{self.account}"
        self.key = base64.b64encode(secrets.token_bytes(32)).decode()
        data = workdir / "data"
        data.mkdir()
        argv = [str(AZURITE_BLOB), "--blobHost", LOOPBACK, "--blobPort", str(self.port)]
        argv += ["--location", str(data), "--skipApiVersionCheck", "--loose"]
        argv += ["--disableTelemetry"]  # telemetry would leave 127.0.0.1
        accounts = {"AZURITE_ACCOUNTS": f"{self.account}:{self.key}"}
        self.process = emulator("azurite-blob", argv, workdir, self.url + "?comp=list", env=accounts)

    def start(self) -> None:
        self.process.start(timeout=STARTUP_TIMEOUT_S)

    def stop(self) -> None:
        self.process.stop()

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={self.account};AccountKey={self.key};BlobEndpoint={self.url};"
        )

    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string}

    def upload_dir(self, local: Path, container: str, prefix: str) -> str:
        from azure.core.exceptions import ResourceExistsError
        from azure.storage.blob import BlobServiceClient

        with BlobServiceClient.from_connection_string(self.connection_string) as client:
            with contextlib.suppress(ResourceExistsError):
                client.create_container(container)
            for path in sorted(p for p in local.rglob("*") if p.is_file()):
                blob = client.get_blob_client(container, f"{prefix}/{path.relative_to(local)}")
                with open(path, "rb") as data:
                    blob.upload_blob(data, overwrite=True)
        return f"az://{container}/{prefix}"


@pytest.fixture(autouse=True)
def _no_ambient_cloud_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(AMBIENT_PREFIXES):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsEmulator]:
    if importlib.util.find_spec("gcp_storage_emulator") is None:
        pytest.skip(f"gcp-storage-emulator is not installed ({INSTALL_HINT})")
    emulator = GcsEmulator(tmp_path_factory.mktemp("gcs"))
    try:
        emulator.start()
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    if shutil.which("node") is None:
        pytest.skip("node is not installed: Azurite (the Azure Blob emulator) runs on it")
    if not AZURITE_BLOB.exists():
        pytest.skip(f"Azurite is not installed at {AZURITE_BLOB.relative_to(REPO)} ({INSTALL_HINT})")
    emulator = Azurite(tmp_path_factory.mktemp("azurite"))
    try:
        emulator.start()
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture(params=["gs", "az"])
def object_store(request: pytest.FixtureRequest) -> ObjectStore:
    store: ObjectStore = request.getfixturevalue({"gs": "gcs", "az": "azurite"}[request.param])
    return store


def test_sharded_model_is_staged_byte_identical_and_reused(object_store: ObjectStore, tmp_path: Path) -> None:
    src = write_model_dir(tmp_path / "src", shards=2)
    uri = object_store.upload_dir(src, "models", "tiny")
    store = tmp_path / "store"
    load = ("--model", "tiny", "--store", store, *LOAD_ARGS)

    first = result_json(run_load(uri, *load, env=object_store.env()))
    assert first["version"] == "1" and not first["reused"]
    current = store / "tiny" / "current"
    staged = tree_digests(current)
    del staged["manifest.json"]
    assert staged == tree_digests(src)
    assert json.loads((current / "manifest.json").read_text())["source"]["uri"] == uri

    # The backend reports stable identities (etag, generation...): an unchanged source is not copied again.
    again = result_json(run_load(uri, *load, env=object_store.env()))
    assert again["version"] == "1" and again["reused"] and again["bytes"] == 0


@pytest.mark.parametrize("where", ["missing-prefix", "missing-container"])
def test_missing_source_exits_3_not_found(object_store: ObjectStore, tmp_path: Path, where: str) -> None:
    object_store.upload_dir(write_model_dir(tmp_path / "src"), "present", "model")
    container, prefix = ("present", "absent") if where == "missing-prefix" else ("absent-container", "model")
    uri = f"{object_store.scheme}://{container}/{prefix}"
    proc = run_load(uri, "--model", "m", "--store", tmp_path / "store", *LOAD_ARGS, env=object_store.env())
    assert proc.returncode == 3, proc.stderr
    assert "not found" in error_line(proc) and uri in error_line(proc)
    assert not (tmp_path / "store" / "m" / "current").exists()


def test_load_closes_its_clients_and_logs_only_events(object_store: ObjectStore, tmp_path: Path) -> None:
    """No "Unclosed connector" warnings, no finalizer tracebacks at exit: a sidecar's log is its events."""
    uri = object_store.upload_dir(write_model_dir(tmp_path / "src"), "closing", "model")
    proc = run_load(uri, "--model", "m", "--store", tmp_path / "store", *LOAD_ARGS, env=object_store.env())
    result_json(proc)
    assert [line for line in proc.stderr.splitlines() if not line.startswith("{")] == [], proc.stderr


def test_gcs_emulator_is_reached_without_looking_for_credentials(gcs: GcsEmulator, tmp_path: Path) -> None:
    uri = gcs.upload_dir(write_model_dir(tmp_path / "src"), "anonymous", "model")
    gcs.credential_probes()  # start from an empty trap
    result_json(run_load(uri, "--model", "m", "--store", tmp_path / "store", *LOAD_ARGS, env=gcs.env()))
    assert gcs.credential_probes() == 0, "gcsfs looked for credentials on the GCE metadata server"


def test_azure_wrong_key_is_access_denied_without_retries(azurite: Azurite, tmp_path: Path) -> None:
    uri = azurite.upload_dir(write_model_dir(tmp_path / "src"), "locked", "model")
    wrong = azurite.connection_string.replace(azurite.key, base64.b64encode(secrets.token_bytes(32)).decode())
    proc = run_load(uri, "--model", "m", "--store", tmp_path / "store", env={"AZURE_STORAGE_CONNECTION_STRING": wrong})
    assert proc.returncode == 4, proc.stderr
    assert "access denied" in error_line(proc) and uri in error_line(proc)
    assert '"retry"' not in proc.stderr
