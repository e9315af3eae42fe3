"""NodePublishVolume and NodeUnpublishVolume for real: the model's view bound read-only at the pod's target (the
pod's containers cannot write it), the reference recorded with the pod's namespace and name, repeated calls
idempotent, a target holding something else refused, and everything gone after unpublish. The server runs under
`unshare -m --propagation private`, so its mounts exist only in its own mount namespace; the test looks at them
through /proc/PID/root and /proc/PID/mountinfo, and checks that none reached this namespace."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import grpc
import pytest

from tests.kit.models import write_model_dir
from tests.node.conftest import VIEW_FILES, CsiNode, publish_request, rpc_error, unpublish_request
from warmpod.node.mounts import is_mount_point, mount_points
from warmpod.store import current_version, version_dir

pytestmark = [pytest.mark.namespace, pytest.mark.timeout(60)]


def _mounts_at(node: CsiNode, target: Path) -> int:
    """How many mounts are stacked on `target` in the server's mount namespace."""
    return sum(1 for line in node.mountinfo.read_text().splitlines() if line.split()[4] == str(target))


def test_publish_binds_the_view_read_only_and_records_the_pod(csi_node_ns: CsiNode) -> None:
    node = csi_node_ns
    target = node.target("csi-0a1b2c")
    node.node.NodePublishVolume(publish_request(target, "csi-0a1b2c", model="tiny", namespace="team-a"))

    seen = node.inside(target)
    assert is_mount_point(target, node.mountinfo)
    assert "ro" in mount_points(node.mountinfo)[str(target)].split(",")
    assert {p.name: p.read_bytes() for p in seen.iterdir()} == VIEW_FILES
    with pytest.raises(OSError) as written:
        (seen / "model.safetensors").write_bytes(b"overwritten by a pod")
    assert written.value.errno == errno.EROFS
    with pytest.raises(OSError) as created:
        (seen / "new-file").write_bytes(b"")
    assert created.value.errno == errno.EROFS
    assert (node.views["tiny"] / "model.safetensors").read_bytes() == VIEW_FILES["model.safetensors"]

    assert not is_mount_point(target)  # nothing leaked into this mount namespace
    assert list(target.iterdir()) == []  # here it is the empty directory the server made
    record = node.references()["csi-0a1b2c"]
    assert {k: record[k] for k in ("model", "namespace", "pod", "target")} == {
        "model": "tiny", "namespace": "team-a", "pod": "embedder-7d9f", "target": str(target),
    }  # fmt: skip


def test_publish_again_is_ok_and_mounts_once(csi_node_ns: CsiNode) -> None:
    node = csi_node_ns
    target = node.target("csi-again")
    for _ in range(3):
        node.node.NodePublishVolume(publish_request(target, "csi-again"))
    assert _mounts_at(node, target) == 1
    assert node.references()["csi-again"]["model"] == "tiny"
    assert (node.inside(target) / "config.json").read_bytes() == VIEW_FILES["config.json"]


def test_publish_over_another_models_mount_is_already_exists(csi_node_ns: CsiNode) -> None:
    node = csi_node_ns
    target = node.target("csi-taken")
    node.node.NodePublishVolume(publish_request(target, "csi-taken", model="tiny"))
    error = rpc_error(lambda: node.node.NodePublishVolume(publish_request(target, "csi-taken", model="other")))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert f"target_path {target} is already a mount point, but not of model 'other'" in error.details()
    assert _mounts_at(node, target) == 1
    assert (node.inside(target) / "config.json").read_bytes() == VIEW_FILES["config.json"]  # still tiny's
    assert node.references()["csi-taken"]["model"] == "tiny"


def test_unpublish_unmounts_removes_and_forgets_every_time(csi_node_ns: CsiNode) -> None:
    node = csi_node_ns
    target = node.target("csi-done")
    node.node.NodePublishVolume(publish_request(target, "csi-done"))
    assert is_mount_point(target, node.mountinfo)
    for _ in range(2):  # the second finds nothing to do, and says OK
        node.node.NodeUnpublishVolume(unpublish_request(target, "csi-done"))
        assert not is_mount_point(target, node.mountinfo)
        assert not node.inside(target).exists() and not target.exists()
        assert "csi-done" not in node.references()
    assert target.parent.is_dir()  # the kubelet's directory stays the kubelet's
    assert sorted(p.name for p in node.views["tiny"].iterdir()) == sorted(VIEW_FILES)  # the view is untouched


def test_publish_after_unpublish_mounts_again(csi_node_ns: CsiNode) -> None:
    node = csi_node_ns
    target = node.target("csi-cycle")
    for _ in range(2):
        node.node.NodePublishVolume(publish_request(target, "csi-cycle"))
        assert _mounts_at(node, target) == 1
        node.node.NodeUnpublishVolume(unpublish_request(target, "csi-cycle"))
        assert _mounts_at(node, target) == 0
    assert node.references() == {}


def test_a_reference_that_cannot_be_recorded_leaves_no_mount(csi_node_ns: CsiNode) -> None:
    node = csi_node_ns
    target = node.target("csi-unrecorded")
    error = rpc_error(lambda: node.node.NodePublishVolume(publish_request(target, "csi-unrecorded",
                                                                          model="unrecordable")))  # fmt: skip
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "cannot record the reference of volume csi-unrecorded" in error.details()
    assert _mounts_at(node, target) == 0 and not target.exists()


def test_the_node_agent_stages_and_hands_out_its_model(tmp_path: Path, namespaced: None) -> None:
    """The real NodeAgent behind the socket: a miss stages the model from its origin, the pod's volume shows the
    agent's view (a store root holding that model only), the reference is on the agent's disk, and goes."""
    source = write_model_dir(tmp_path / "origin" / "mini")
    node = CsiNode(tmp_path / "node", namespace=True,
                   agent_catalog={"models": {"mini": {"source": str(source), "namespaces": ["team-a"]}}})  # fmt: skip
    node.start()
    try:
        target = node.target("csi-mini")
        for _ in range(2):  # a miss that stages, then a hit
            node.node.NodePublishVolume(publish_request(target, "csi-mini", model="mini"))
        assert _mounts_at(node, target) == 1
        seen = node.inside(target)
        assert [p.name for p in seen.iterdir()] == ["mini"]
        served = {p.relative_to(source): p.read_bytes() for p in source.rglob("*") if p.is_file()}
        staged = current_version(seen, "mini")
        assert staged is not None
        version = version_dir(seen, "mini", staged)
        assert {rel: (version / rel).read_bytes() for rel in served} == served
        with pytest.raises(OSError) as written:
            (version / "config.json").write_text("{}")
        assert written.value.errno == errno.EROFS
        record = json.loads((node.agent_root / ".volumes" / "csi-mini.json").read_text())
        assert (record["model"], record["namespace"], record["pod"]) == ("mini", "team-a", "embedder-7d9f")

        node.node.NodeUnpublishVolume(unpublish_request(target, "csi-mini"))
        assert _mounts_at(node, target) == 0 and not target.exists()
        assert not (node.agent_root / ".volumes" / "csi-mini.json").exists()
    finally:
        node.stop()
