"""The CSI node plugin (CSI spec v1): the Identity and Node services on a unix socket, through which the kubelet hands
a pod its model as a read-only ephemeral inline volume.

NodePublishVolume checks the kubelet's call (`parse_publish`, pure), waits for the model (`VolumeBackend.ensure_model`:
the catalog, staging, the publish timeout), binds the model's view read-only at the target and records the reference.
The volume is always mounted read-only: a read-only access mode is not required (the kubelet asks for
SINGLE_NODE_WRITER for inline volumes, and `readonly` may be false), and mount flags and fs_type are ignored. Every
NodeError becomes its `grpc_status` with its message, in one place (`_answer`); the kubelet retries what failed.

Idempotent, as CSI requires: publishing a target that already holds this model's view is OK (the reference is
recorded again); a target holding anything else is ALREADY_EXISTS. Unpublishing a volume that is not mounted, or not
known, is OK. Calls for one volume id run one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import socket
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import wrappers_pb2

from warmpod import __version__
from warmpod.errors import UsageError
from warmpod.node import csi_pb2, csi_pb2_grpc
from warmpod.node.errors import InvalidVolume, NodeError
from warmpod.node.mounts import bind_read_only, is_mount_point, unmount

log = logging.getLogger("warmpod.node.csi")

DRIVER_NAME = "node.warmpod.dev"
# volume_context keys: ours, and those the kubelet adds (the CSIDriver's podInfoOnMount: true).
MODEL_KEY = "model"
EPHEMERAL_KEY = "csi.storage.k8s.io/ephemeral"
POD_NAME_KEY = "csi.storage.k8s.io/pod.name"
POD_NAMESPACE_KEY = "csi.storage.k8s.io/pod.namespace"
# Bind mounts stacked on one target (a publish cut short by a crash) are unmounted up to this many deep.
MAX_STACKED_MOUNTS = 8
VOLUME_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

T = TypeVar("T")


class VolumeBackend(Protocol):
    """What the CSI service needs of the node agent (warmpod.node.agent.NodeAgent implements it)."""

    async def ensure_model(self, name: str, namespace: str | None) -> Path:
        """The model's view directory to bind, once staged; NotInCatalog, NamespaceDenied, SourceMissing,
        OverBudget, StagingTimeout."""
        ...

    def reference(self, volume_id: str, model: str, *, namespace: str | None, pod: str | None, target: Path) -> None:
        """Record that `volume_id` (published at `target`) uses `model`."""
        ...

    def unreference(self, volume_id: str) -> dict[str, Any] | None:
        """Drop the reference: its record, or None when the volume is unknown."""
        ...


class TargetInUse(NodeError):
    """The target path is already a mount point of something other than the model the call asks for."""

    grpc_status = "ALREADY_EXISTS"


# ------------------------------------------------------------------------------------------ the kubelet's calls


@dataclass(frozen=True)
class Publish:
    """A NodePublishVolume call that passed every check."""

    volume_id: str
    target: Path
    model: str
    namespace: str | None
    pod: str | None


def check_volume_id(volume_id: str) -> str:
    """The agent names a file after the volume id (ROOT/.volumes/VOLUME_ID.json), so no path may hide in it: the
    agent's rule, at most CSI's 128 bytes. The kubelet's ids for inline volumes are `csi-` and a sha256."""
    if not volume_id:
        raise InvalidVolume("volume_id is missing: the kubelet sends one with every call")
    if not VOLUME_ID.fullmatch(volume_id):
        raise InvalidVolume(
            f"volume_id {volume_id!r} is not a plain name: letters, digits, '.', '_', ':' or '-', starting with a "
            "letter or digit, at most 128 characters"
        )
    return volume_id


def check_target(target_path: str, pods_dir: Path) -> Path:
    """The target, resolved (`..` and symbolic links), strictly below the kubelet's pods directory `pods_dir`
    (itself resolved): the plugin mounts and removes directories only there."""
    if not target_path:
        raise InvalidVolume("target_path is missing: the kubelet sends the pod's volume directory")
    if not os.path.isabs(target_path):
        raise InvalidVolume(f"target_path {target_path!r} is not an absolute path")
    target = Path(os.path.realpath(target_path))
    if target == pods_dir or not target.is_relative_to(pods_dir):
        raise InvalidVolume(
            f"target_path {target_path!r} (resolved: {target}) is not under the kubelet's pods directory {pods_dir}/: "
            "warmpod mounts only into pods' volume directories (is --kubelet-dir the kubelet's --root-dir?)"
        )
    return target


def parse_publish(request: csi_pb2.NodePublishVolumeRequest, pods_dir: Path) -> Publish:
    """The checked call, or InvalidVolume naming the first thing wrong and how to fix it."""
    volume_id = check_volume_id(request.volume_id)
    target = check_target(request.target_path, pods_dir)
    if not request.HasField("volume_capability"):
        raise InvalidVolume("volume_capability is missing: a warmpod volume is a mount volume")
    access_type = request.volume_capability.WhichOneof("access_type")
    if access_type != "mount":
        what = "a block volume" if access_type == "block" else "no access type"
        raise InvalidVolume(f"volume_capability asks for {what}: a warmpod volume is a directory (a mount volume)")
    context = request.volume_context
    if context.get(EPHEMERAL_KEY) != "true":
        raise InvalidVolume(
            f"warmpod serves CSI ephemeral inline volumes only (volume_context {EPHEMERAL_KEY} is "
            f"{context.get(EPHEMERAL_KEY)!r}, not 'true'): use a `csi:` volume in the pod spec, and give the "
            "CSIDriver volumeLifecycleModes [Ephemeral] and podInfoOnMount: true"
        )
    model = context.get(MODEL_KEY, "")
    if not model:
        raise InvalidVolume(
            f"volume_context has no {MODEL_KEY!r}: set volumeAttributes.{MODEL_KEY} of the pod's csi volume to a model "
            "of the warmpod catalog"
        )
    return Publish(volume_id, target, model, context.get(POD_NAMESPACE_KEY) or None, context.get(POD_NAME_KEY) or None)


def parse_unpublish(request: csi_pb2.NodeUnpublishVolumeRequest, pods_dir: Path) -> tuple[str, Path]:
    return check_volume_id(request.volume_id), check_target(request.target_path, pods_dir)


# ------------------------------------------------------------------------------------------ the services


async def _answer(context: grpc.aio.ServicerContext[Any, Any], work: Awaitable[T]) -> T:
    """The one place errors become gRPC statuses: a NodeError its `grpc_status` with its message; anything else
    INTERNAL (and the traceback in the log)."""
    try:
        return await work
    except NodeError as err:
        log.warning("%s: %s", err.grpc_status, err)
        await context.abort(grpc.StatusCode[err.grpc_status], str(err))
    except Exception as err:
        log.exception("CSI call failed")
        await context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, driver_name: str, version: str) -> None:
        self.driver_name, self.version = driver_name, version

    async def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=self.driver_name, vendor_version=self.version)

    async def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        return csi_pb2.GetPluginCapabilitiesResponse()  # a node plugin only: no controller service

    async def Probe(
        self, request: csi_pb2.ProbeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> csi_pb2.ProbeResponse:
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))


@dataclass
class _VolumeLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(self, backend: VolumeBackend, *, node_id: str, kubelet_dir: Path) -> None:
        self.backend, self.node_id = backend, node_id
        self.pods_dir = Path(os.path.realpath(kubelet_dir)) / "pods"
        self._volumes: dict[str, _VolumeLock] = {}

    async def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> csi_pb2.NodePublishVolumeResponse:
        await _answer(context, self.publish(request))
        return csi_pb2.NodePublishVolumeResponse()

    async def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        await _answer(context, self.unpublish(request))
        return csi_pb2.NodeUnpublishVolumeResponse()

    async def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse()  # ephemeral volumes, no staging, no stats

    async def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(node_id=self.node_id, max_volumes_per_node=0)  # 0: no limit

    async def publish(self, request: csi_pb2.NodePublishVolumeRequest) -> None:
        call = parse_publish(request, self.pods_dir)
        async with self._one_call(call.volume_id):
            view = await self.backend.ensure_model(call.model, call.namespace)
            mounted_now = False
            if is_mount_point(call.target):
                if not _same_directory(view, call.target):
                    raise TargetInUse(
                        f"target_path {call.target} is already a mount point, but not of model {call.model!r} "
                        f"(volume {call.volume_id}): unpublish what is mounted there first"
                    )
            else:
                _bind(view, call.target, call.model)
                mounted_now = True
            try:
                self.backend.reference(call.volume_id, call.model, namespace=call.namespace, pod=call.pod,
                                       target=call.target)  # fmt: skip
            except BaseException:
                if mounted_now:  # no mount without its reference: the kubelet retries the whole call
                    _remove_target(call.target)
                raise
            log.info("published model %s at %s (volume %s, pod %s/%s)", call.model, call.target, call.volume_id,
                     call.namespace, call.pod)  # fmt: skip

    async def unpublish(self, request: csi_pb2.NodeUnpublishVolumeRequest) -> None:
        volume_id, target = parse_unpublish(request, self.pods_dir)
        async with self._one_call(volume_id):
            _remove_target(target)
            record = self.backend.unreference(volume_id)
            log.info("unpublished volume %s at %s%s", volume_id, target, "" if record else " (not known)")

    @contextlib.asynccontextmanager
    async def _one_call(self, volume_id: str) -> AsyncIterator[None]:
        """Calls for one volume id one at a time (the kubelet retries a call that timed out while it still runs)."""
        entry = self._volumes.setdefault(volume_id, _VolumeLock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._volumes[volume_id]


def _same_directory(a: Path, b: Path) -> bool:
    """A bind mount's root is the very directory it binds: same device, same inode."""
    sa, sb = a.stat(), b.stat()
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _bind(view: Path, target: Path, model: str) -> None:
    created = not target.exists()
    try:
        target.mkdir(parents=True, exist_ok=True)
        bind_read_only(view, target)
    except OSError as err:
        if created:
            with contextlib.suppress(OSError):
                target.rmdir()
        raise NodeError(f"cannot mount model {model!r} at {target}: {err.strerror or err}") from err


def _remove_target(target: Path) -> None:
    """Unmount the target (every bind stacked on it) and remove the directory; nothing there is fine."""
    try:
        for _ in range(MAX_STACKED_MOUNTS):
            if not is_mount_point(target):
                break
            try:
                unmount(target)
            except OSError as err:
                if err.errno != errno.EBUSY:
                    raise
                unmount(target, lazy=True)  # a process still has it open: detach now, freed when it lets go
        else:
            raise NodeError(f"{target} is still a mount point after {MAX_STACKED_MOUNTS} unmounts")
        with contextlib.suppress(FileNotFoundError):
            target.rmdir()
    except OSError as err:
        raise NodeError(f"cannot remove the volume at {target}: {err.strerror or err}") from err


# ------------------------------------------------------------------------------------------ the server


async def serve_csi(
    backend: VolumeBackend,
    socket_path: Path,
    *,
    node_id: str,
    kubelet_dir: Path,
    driver_name: str = DRIVER_NAME,
    version: str = __version__,
) -> grpc.aio.Server:
    """Serve Identity and Node on `unix://socket_path` (a stale socket there is removed first); started. Stop it with
    `await server.stop(grace)`."""
    if not node_id:
        raise UsageError("the CSI node id is empty: give the node's name (the DaemonSet passes spec.nodeName)")
    _clear_stale_socket(socket_path)
    server = grpc.aio.server()
    # The generated registration functions carry no annotations.
    identity = IdentityService(driver_name, version)
    node = NodeService(backend, node_id=node_id, kubelet_dir=kubelet_dir)
    csi_pb2_grpc.add_IdentityServicer_to_server(identity, server)  # type: ignore[no-untyped-call]
    csi_pb2_grpc.add_NodeServicer_to_server(node, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"unix://{socket_path.absolute()}")
    await server.start()
    log.info("CSI %s %s serving on unix://%s (node %s)", driver_name, version, socket_path, node_id)
    return server


def _clear_stale_socket(socket_path: Path) -> None:
    """Remove a socket nobody answers on (left by an agent that died); refuse a live one or anything else."""
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    if not socket_path.exists() and not socket_path.is_symlink():
        return
    if not socket_path.is_socket():
        raise UsageError(f"{socket_path} exists and is not a socket: refusing to replace it with the CSI socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(socket_path))
        except OSError:
            socket_path.unlink()
            return
    raise UsageError(f"another process serves on {socket_path}: is a second warmpod node agent running on this node?")
