"""The committed csi_pb2*.py are what node/csi-gen.sh makes from the committed node/csi.proto, so the two cannot drift;
and the generated descriptors are the CSI spec's (package, services, the field numbers the kubelet sends)."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

from warmpod.node import csi_pb2

NODE = Path(__file__).parents[2] / "node"
GENERATED = ("csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py")


@pytest.mark.process
def test_committed_stubs_are_generated_from_the_proto(tmp_path: Path) -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools is not installed (the dev extra: pip install -e '.[dev]')")
    done = subprocess.run([NODE / "csi-gen.sh", tmp_path], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr, done.stderr  # another grpcio-tools writes other version numbers
    stale = [name for name in GENERATED if (tmp_path / name).read_bytes() != (NODE / name).read_bytes()]
    assert stale == [], f"{stale} differ from what node/csi.proto generates: run node/csi-gen.sh and commit them"


@pytest.mark.unit
def test_the_messages_the_kubelet_sends_have_the_specs_field_numbers() -> None:
    fields = {
        name: {f.name: f.number for f in csi_pb2.DESCRIPTOR.message_types_by_name[name].fields}
        for name in ("NodePublishVolumeRequest", "NodeUnpublishVolumeRequest", "VolumeCapability", "ProbeResponse")
    }
    assert fields["NodePublishVolumeRequest"] == {
        "volume_id": 1, "publish_context": 2, "staging_target_path": 3, "target_path": 4, "volume_capability": 5,
        "readonly": 6, "secrets": 7, "volume_context": 8,
    }  # fmt: skip
    assert fields["NodeUnpublishVolumeRequest"] == {"volume_id": 1, "target_path": 2}
    assert fields["VolumeCapability"] == {"block": 1, "mount": 2, "access_mode": 3}
    assert fields["ProbeResponse"] == {"ready": 1}
    assert csi_pb2.DESCRIPTOR.package == "csi.v1"
    services = {s.full_name: [m.name for m in s.methods] for s in csi_pb2.DESCRIPTOR.services_by_name.values()}
    assert services == {
        "csi.v1.Identity": ["GetPluginInfo", "GetPluginCapabilities", "Probe"],
        "csi.v1.Node": ["NodePublishVolume", "NodeUnpublishVolume", "NodeGetCapabilities", "NodeGetInfo"],
    }
