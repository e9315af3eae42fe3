"""The CSI plugin as the kubelet calls it, without mounting: Identity and the Node basics, every malformed
NodePublishVolume/NodeUnpublishVolume with its INVALID_ARGUMENT message, every backend refusal with its gRPC status,
unpublishing what is not there, and the socket's life (a stale one replaced, a live one refused). Generated stubs over
the unix socket, a server in a child process (tests/node/conftest.py)."""

from __future__ import annotations

import re
import socket
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2

from tests.kit.procs import ChildProcess
from tests.node.conftest import NODE_ID, CsiNode, publish_request, rpc_error, unpublish_request
from warmpod.node import csi_pb2

pytestmark = [pytest.mark.process, pytest.mark.timeout(60)]


# ------------------------------------------------------------------------------------------ Identity, Node basics


def test_identity_names_the_driver_and_is_ready(csi_node: CsiNode) -> None:
    info = csi_node.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert (info.name, info.vendor_version) == ("node.warmpod.dev", "0.0.0-test")
    capabilities = csi_node.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    assert list(capabilities.capabilities) == []  # a node plugin only: no controller service
    probe = csi_node.identity.Probe(csi_pb2.ProbeRequest())
    assert probe.HasField("ready") and probe.ready.value is True


def test_node_info_and_capabilities(csi_node: CsiNode) -> None:
    info = csi_node.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert (info.node_id, info.max_volumes_per_node) == (NODE_ID, 0)
    assert not info.HasField("accessible_topology")
    capabilities = csi_node.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
    assert list(capabilities.capabilities) == []  # no STAGE_UNSTAGE_VOLUME: the kubelet publishes directly


@pytest.mark.parametrize(
    "method", ["/csi.v1.Node/NodeStageVolume", "/csi.v1.Node/NodeGetVolumeStats", "/csi.v1.Controller/CreateVolume"]
)
def test_calls_it_does_not_serve_are_unimplemented(csi_node: CsiNode, method: str) -> None:
    assert csi_node.channel is not None
    call = csi_node.channel.unary_unary(method, request_serializer=empty_pb2.Empty.SerializeToString,
                                        response_deserializer=empty_pb2.Empty.FromString)  # fmt: skip
    assert rpc_error(lambda: call(empty_pb2.Empty())).code() == grpc.StatusCode.UNIMPLEMENTED


# ------------------------------------------------------------------------------------------ malformed calls


def _bad_publishes(node: CsiNode) -> dict[str, tuple[csi_pb2.NodePublishVolumeRequest, str]]:
    """Each bad call → a piece of the message that must say what is wrong."""
    target = node.target("csi-bad")
    outside = node.workdir / "elsewhere"
    outside.mkdir(exist_ok=True)
    link_parent = node.pods_dir / "0c6f8a7e-uid" / "volumes" / "kubernetes.io~csi" / "csi-link"
    link_parent.parent.mkdir(parents=True, exist_ok=True)
    if not link_parent.is_symlink():
        link_parent.symlink_to(outside)  # a path under pods/ that leads out of it
    pods = node.pods_dir
    return {
        "no volume id": (publish_request(target, volume_id=""), "volume_id is missing"),
        "volume id with a slash": (publish_request(target, volume_id="../etc"), "is not a plain name"),
        "volume id too long": (publish_request(target, volume_id="v" * 129), "at most 128 characters"),
        "no target": (publish_request(""), "target_path is missing"),
        "relative target": (publish_request("pods/x/mount"), "is not an absolute path"),
        "target outside": (publish_request(outside / "mount"), "is not under the kubelet's pods directory"),
        "target escapes with ..": (
            publish_request(f"{pods}/0c6f8a7e-uid/../../../elsewhere/mount"),
            f"(resolved: {outside / 'mount'}) is not under the kubelet's pods directory {pods}/",
        ),
        "target is the pods dir": (publish_request(f"{pods}/x/.."), "is not under the kubelet's pods directory"),
        "target beside the pods dir": (publish_request(f"{pods}-other/x/mount"), "is not under"),
        "target through a symlink": (publish_request(link_parent / "mount"), f"(resolved: {outside / 'mount'})"),
        "no capability": (publish_request(target, access_type=None), "volume_capability is missing"),
        "block": (publish_request(target, access_type="block"), "asks for a block volume"),
        "no access type": (publish_request(target, access_type="none"), "asks for no access type"),
        "not ephemeral": (publish_request(target, ephemeral=None), "ephemeral inline volumes only"),
        "ephemeral false": (publish_request(target, ephemeral="false"), "is 'false', not 'true'"),
        "no model": (publish_request(target, model=None), "volume_context has no 'model'"),
        "empty model": (publish_request(target, model=""), "set volumeAttributes.model"),
    }


BAD_PUBLISHES = [
    "no volume id", "volume id with a slash", "volume id too long", "no target", "relative target", "target outside",
    "target escapes with ..", "target is the pods dir", "target beside the pods dir", "target through a symlink",
    "no capability", "block", "no access type", "not ephemeral", "ephemeral false", "no model", "empty model",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_PUBLISHES)
def test_malformed_publish_is_invalid_argument(csi_node: CsiNode, case: str) -> None:
    request, message = _bad_publishes(csi_node)[case]
    error = rpc_error(lambda: csi_node.node.NodePublishVolume(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert message in error.details()
    assert request.volume_id not in csi_node.references()
    assert not (csi_node.workdir / "elsewhere" / "mount").exists()


def test_every_bad_case_is_tested(csi_node: CsiNode) -> None:
    assert sorted(_bad_publishes(csi_node)) == sorted(BAD_PUBLISHES)


def test_not_ephemeral_says_how_to_configure_the_driver(csi_node: CsiNode) -> None:
    request = publish_request(csi_node.target("csi-persistent"), ephemeral=None)
    details = rpc_error(lambda: csi_node.node.NodePublishVolume(request)).details()
    assert "volumeLifecycleModes [Ephemeral]" in details and "podInfoOnMount: true" in details


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (unpublish_request("/kubelet/pods/x/mount", volume_id=""), "volume_id is missing"),
        (unpublish_request(""), "target_path is missing"),
        (unpublish_request("/etc"), "is not under the kubelet's pods directory"),
    ],
)
def test_malformed_unpublish_is_invalid_argument(
    csi_node: CsiNode, request_: csi_pb2.NodeUnpublishVolumeRequest, message: str
) -> None:
    error = rpc_error(lambda: csi_node.node.NodeUnpublishVolume(request_))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()


def test_unpublish_escaping_the_pods_dir_removes_nothing(csi_node: CsiNode) -> None:
    victim = csi_node.workdir / "victim"
    victim.mkdir()
    error = rpc_error(lambda: csi_node.node.NodeUnpublishVolume(unpublish_request(f"{csi_node.pods_dir}/../../victim")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert victim.is_dir()


# ------------------------------------------------------------------------------------------ the backend refuses


@pytest.mark.parametrize(
    ("model", "namespace", "code", "message"),
    [
        ("llama-70b", "team-a", grpc.StatusCode.NOT_FOUND, "model 'llama-70b' is not in this node's catalog"),
        ("tiny", "team-b", grpc.StatusCode.PERMISSION_DENIED, "namespace 'team-b' may not mount model 'tiny'"),
        ("tiny", None, grpc.StatusCode.PERMISSION_DENIED, "namespace None may not mount model 'tiny'"),
        ("huge", "team-a", grpc.StatusCode.RESOURCE_EXHAUSTED, "the node budget is 64 GB (--max-bytes)"),
        ("gone", "team-a", grpc.StatusCode.NOT_FOUND, "(s3://models/gone/) does not exist"),
        ("slow", "team-a", grpc.StatusCode.DEADLINE_EXCEEDED, "not staged within 120 s (--publish-timeout)"),
    ],
)
def test_backend_errors_answer_with_their_status(
    csi_node: CsiNode, model: str, namespace: str | None, code: grpc.StatusCode, message: str
) -> None:
    target = csi_node.target(f"csi-{model}")
    request = publish_request(target, f"csi-{model}", model=model, namespace=namespace)
    error = rpc_error(lambda: csi_node.node.NodePublishVolume(request))
    assert error.code() == code, error.details()
    assert message in error.details()
    assert not target.exists()  # nothing made before the model is there
    assert f"csi-{model}" not in csi_node.references()


# ------------------------------------------------------------------------------------------ nothing to unpublish


def test_unpublish_of_an_unknown_volume_is_ok_every_time(csi_node: CsiNode) -> None:
    target = csi_node.target("csi-never")
    for _ in range(2):
        csi_node.node.NodeUnpublishVolume(unpublish_request(target, "csi-never"))
    assert not target.exists()


def test_unpublish_removes_an_empty_target_left_behind(csi_node: CsiNode) -> None:
    target = csi_node.target("csi-left")
    target.mkdir()
    csi_node.node.NodeUnpublishVolume(unpublish_request(target, "csi-left"))
    assert not target.exists()


# ------------------------------------------------------------------------------------------ the socket


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    node = CsiNode(tmp_path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(node.socket))
    stale.close()  # the file stays, nobody listens: what an agent that died leaves
    node.start()
    try:
        assert node.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True
    finally:
        node.stop()


def test_a_live_socket_is_refused(csi_node: CsiNode) -> None:
    second = ChildProcess([sys.executable, "-m", "tests.node.csi_backend", csi_node.child.argv[-1]], name="csi-2",
                          cwd=csi_node.child.cwd)  # fmt: skip
    second.spawn()
    try:
        assert second.wait(30) == 2
    finally:
        second.stop()
    assert re.search(rf"another process serves on {re.escape(str(csi_node.socket))}", second.log())
    assert csi_node.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True  # the first one still serves
