"""The CSI server as the kubelet meets it: a child process serving on a unix socket (`CsiNode`), the generated stubs
over a real channel, and NodePublishVolume requests shaped like the kubelet's for an inline volume."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.kit.procs import ChildProcess
from tests.node.csi_backend import READY_LINE, DirBackend
from warmpod.node import csi_pb2, csi_pb2_grpc

REPO = Path(__file__).parents[2]
NODE_ID = "node-a"
VIEW_FILES = {"model.safetensors": b"weights of tiny", "config.json": b'{"model": "tiny"}'}
CATALOG = {
    "models": {
        "tiny": {"source": "s3://models/tiny/", "namespaces": ["team-a"]},
        "other": {"source": "s3://models/other/", "namespaces": ["*"]},
        "huge": {"source": "s3://models/huge/", "namespaces": ["*"]},
        "gone": {"source": "s3://models/gone/", "namespaces": ["*"]},
        "slow": {"source": "s3://models/slow/", "namespaces": ["*"]},
        "unrecordable": {"source": "s3://models/unrecordable/", "namespaces": ["*"]},
    }
}
FAILURES = {
    "huge": ["OverBudget", "model 'huge' needs 90 GB; the node budget is 64 GB (--max-bytes)"],
    "gone": ["SourceMissing", "the source of model 'gone' (s3://models/gone/) does not exist"],
    "slow": ["StagingTimeout", "model 'slow' was not staged within 120 s (--publish-timeout); staging goes on"],
}


class CsiNode:
    """The CSI server in a child process (under `unshare -m --propagation private` with `namespace=True`, so its
    mounts stay in its own mount namespace), its kubelet directory, views and references, and stubs to call it. On
    tests.node.csi_backend.DirBackend, or with `agent_catalog` on the real NodeAgent (its store in `agent_root`)."""

    def __init__(self, workdir: Path, *, namespace: bool = False, agent_catalog: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.kubelet_dir = workdir / "kubelet"
        self.pods_dir = self.kubelet_dir / "pods"
        self.pods_dir.mkdir(parents=True)
        self.views = {name: workdir / "views" / name for name in ("tiny", "other", "unrecordable")}
        for name, view in self.views.items():
            view.mkdir(parents=True)
            for file, data in VIEW_FILES.items():
                (view / file).write_bytes(data.replace(b"tiny", name.encode()))
        self.records = workdir / "references.json"
        # A short directory of its own: a unix socket's path has at most 107 bytes.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="warmpod-csi-"))
        self.socket = self._socket_dir / "csi.sock"
        config = {"socket": str(self.socket), "kubelet_dir": str(self.kubelet_dir), "node_id": NODE_ID,
                  "catalog": CATALOG, "views": {k: str(v) for k, v in self.views.items()}, "failures": FAILURES,
                  "unrecordable": ["unrecordable"], "records": str(self.records)}  # fmt: skip
        self.agent_root = workdir / "store"
        if agent_catalog is not None:  # the real NodeAgent, its store at agent_root
            config.update(catalog=agent_catalog, agent_root=str(self.agent_root))
        prefix = ["unshare", "-m", "--propagation", "private"] if namespace else []
        self.child = ChildProcess([*prefix, sys.executable, "-m", "tests.node.csi_backend", json.dumps(config)],
                                  name="csi", ready=re.compile(re.escape(READY_LINE)), cwd=REPO)  # fmt: skip
        self.channel: grpc.Channel | None = None

    def start(self) -> CsiNode:
        self.child.start(timeout=30)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        return self

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.child.stop()
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    def target(self, volume_id: str, pod_uid: str = "0c6f8a7e-uid") -> Path:
        """Where the kubelet publishes an inline CSI volume of a pod (its parent exists, the target does not)."""
        parent = self.pods_dir / pod_uid / "volumes" / "kubernetes.io~csi" / volume_id
        parent.mkdir(parents=True, exist_ok=True)
        return parent / "mount"

    def references(self) -> dict[str, dict[str, Any]]:
        return DirBackend.read(self.records)

    # Seen from inside the server's mount namespace (the same as this one's without namespace=True).
    def inside(self, path: Path) -> Path:
        return Path(f"/proc/{self.child.pid}/root{path}")

    @property
    def mountinfo(self) -> Path:
        return Path(f"/proc/{self.child.pid}/mountinfo")


def publish_request(
    target: Path | str,
    volume_id: str = "csi-0a1b2c",
    *,
    model: str | None = "tiny",
    namespace: str | None = "team-a",
    pod: str = "embedder-7d9f",
    ephemeral: str | None = "true",
    access_type: str | None = "mount",
    drop: tuple[str, ...] = (),
) -> csi_pb2.NodePublishVolumeRequest:
    """A NodePublishVolume call as the kubelet makes it for an inline csi volume with podInfoOnMount (the access
    mode is SINGLE_NODE_WRITER and readonly false unless the pod says otherwise)."""
    context = {"csi.storage.k8s.io/pod.name": pod, "csi.storage.k8s.io/pod.uid": "0c6f8a7e-uid",
               "csi.storage.k8s.io/serviceAccount.name": "default"}  # fmt: skip
    if model is not None:
        context["model"] = model
    if namespace is not None:
        context["csi.storage.k8s.io/pod.namespace"] = namespace
    if ephemeral is not None:
        context["csi.storage.k8s.io/ephemeral"] = ephemeral
    request = csi_pb2.NodePublishVolumeRequest(volume_id=volume_id, target_path=str(target), readonly=False,
                                               volume_context=context)  # fmt: skip
    mode = csi_pb2.VolumeCapability.AccessMode(mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER)
    if access_type == "mount":
        request.volume_capability.CopyFrom(
            csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(), access_mode=mode)
        )
    elif access_type == "block":
        request.volume_capability.CopyFrom(
            csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=mode)
        )
    elif access_type == "none":
        request.volume_capability.CopyFrom(csi_pb2.VolumeCapability(access_mode=mode))
    for name in drop:
        request.ClearField(name)  # type: ignore[arg-type]
    return request


def unpublish_request(target: Path | str, volume_id: str = "csi-0a1b2c") -> csi_pb2.NodeUnpublishVolumeRequest:
    return csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    """The error a call fails with (it must fail)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def mount_namespace_problem() -> str | None:
    """Why the server cannot run in a private mount namespace here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return f"mount namespaces are Linux-only (this is {sys.platform})"
    if os.geteuid() != 0:
        return "not root: a mount namespace and bind mounts need CAP_SYS_ADMIN"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -m failed: {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def csi_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CsiNode]:
    """One CSI server for a module's calls that never reach a mount (checks, backend errors, Identity)."""
    node = CsiNode(tmp_path_factory.mktemp("csi")).start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def csi_node_ns(tmp_path: Path) -> Iterator[CsiNode]:
    """A CSI server in its own private mount namespace: what it mounts never reaches this namespace."""
    problem = mount_namespace_problem()
    if problem:
        pytest.skip(problem)
    node = CsiNode(tmp_path, namespace=True).start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def namespaced() -> None:
    """Skip unless a child can get a private mount namespace here."""
    problem = mount_namespace_problem()
    if problem:
        pytest.skip(problem)
