"""The node cache end to end (issue 14), as processes on one machine, the way tests/deploy/test_pod.py runs a pod.

A node is a mount namespace of its own (`unshare -m --propagation private`, held by a sleeping leader: the node's
host namespace) with one `warmpod node` agent entered into it (nsenter): its node store a tmpfs it mounts
(--tmpfs --max-bytes), its CSI socket, its kubelet directory. A pod is `warmpod serve --store MOUNT --model NAME`,
started by tests/deploy/pod.py's launcher from inside the node's namespace after NodePublishVolume bound the model
at MOUNT: the pod's mount namespace is a copy of the node's taken then (what Bidirectional propagation and the
runtime's recursive bind give a cluster's pod), its root filesystem read-only. The kubelet's side is the generated
CSI stubs over the socket, with the kubelet's requests (tests/node/conftest.publish_request) and its target paths
(<kubelet-dir>/pods/<uid>/volumes/kubernetes.io~csi/<volume>/mount). The origin is SeaweedFS behind a
request-counting FaultProxy. Nothing is ever mounted in the test's own namespace.

1. two pods on one node share one copy: the node store's tmpfs grows by one model, both servers map the same
   files, both serve;
2. a pod deleted and a new one published on the node: no origin request at all, ready again (the time is printed);
3. a second node with an empty store stages from the first node's agent (no weight read at the origin, the files
   byte-identical); a peer cut off mid-transfer, or serving other bytes than its manifest, leaves the load to the
   origin, nothing half-written in sight;
4. a new version at the origin: the pods on both nodes hot-swap under a bounded load, with no failed request;
5. eviction under a small --max-bytes takes only what no pod publishes or maps; an over-budget publish is
   RESOURCE_EXHAUSTED with its message;
6. the kubelet's bad calls through the real agent: NOT_FOUND, PERMISSION_DENIED, INVALID_ARGUMENT, and repeated
   calls that are OK.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tests.kit.clients import LoadThread, http, post_json
from tests.kit.fault_proxy import FaultProxy
from tests.kit.metrics import Scrape
from tests.kit.models import mlp_bytes, mlp_reference, sha256_file, tree_digests, write_mlp
from tests.kit.procs import ChildProcess, free_port, wait_until
from tests.kit.s3 import S3Bucket, SeaweedServer
from tests.kit.warmpod import REPO, ServerProcess, child_env, warmpod_cmd
from tests.node.conftest import mount_namespace_problem, publish_request, rpc_error, unpublish_request
from warmpod.node import csi_pb2_grpc
from warmpod.node.agent import mapped_inodes
from warmpod.node.ls import format_bytes, list_store
from warmpod.node.mounts import mount_points

pytestmark = [pytest.mark.namespace, pytest.mark.seaweed, pytest.mark.timeout(180)]

TEAM = "team-a"  # the namespace the catalog admits to its models
SIZES = (256, 1024, 1024, 10)  # "mlp": ~5 MiB of fp32 weights
SWAP_SIZES = (256, 1024, 10)  # "swap": ~1 MiB, hot-swapped in test 4
SMALL_SIZES = (256, 1280, 10)  # "s1".."s5": ~1.3 MiB each, for the budget of test 5
SMALL = [f"s{i}" for i in range(1, 6)]
NODE_BUDGET = "64MiB"  # every node's --max-bytes but test 5's
LISTENING = re.compile(r'"event": "http_listening".*"port": (\d+)')
CSI_LISTENING = re.compile(r'"event": "csi_listening"')

# Bounds, not goals: every wait ends at a fixed deadline and fails with the logs.
AGENT_START_S = 60
SERVER_READY_S = 90
PUBLISH_S = 60  # a NodePublishVolume call, staging included
SWAP_S = 60


# ------------------------------------------------------------------------------------------ the origin


@dataclass
class Origin:
    """SeaweedFS with a bucket of models (each under models/NAME/), behind a request-counting FaultProxy: the agents
    reach it only through the proxy."""

    s3: SeaweedServer
    bucket: S3Bucket
    proxy: FaultProxy
    sources: Path  # the local copy of each model as uploaded last
    uploaded: dict[str, Path] = field(default_factory=dict)

    def upload(self, name: str, sizes: tuple[int, ...], *, seed: int) -> Path:
        """A generated MLP (logits out, so outputs compare with mlp_reference) uploaded as model `name`."""
        src = write_mlp(self.sources / f"{name}-{seed}", sizes, seed=seed, output_activation=None)
        self.bucket.upload_dir(src, prefix=f"models/{name}/")
        self.uploaded[name] = src
        return src

    def uri(self, name: str) -> str:
        return self.bucket.uri(f"models/{name}/")

    def weight_gets(self, name: str) -> int:
        """GETs of the model's weight file that reached the origin (not listings or HEADs)."""
        return self.proxy.requests.count("GET", path_prefix=f"/{self.bucket.name}/models/{name}/model.safetensors")

    def requests(self) -> int:
        """Every request the origin got so far (listings, HEADs, GETs)."""
        return len(self.proxy.requests)

    def env(self) -> dict[str, str]:
        """The agents' S3 settings: SeaweedFS's keys, the proxy's address."""
        return self.s3.env(self.proxy.endpoint)


def node_problem() -> str | None:
    """Why nodes cannot run here (a private mount namespace, and nsenter to start processes in it), or None."""
    if shutil.which("nsenter") is None:
        return "nsenter (util-linux) is not installed: agents and pods are started inside a node's mount namespace"
    return mount_namespace_problem()


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Origin]:
    problem = node_problem()  # asked first: SeaweedFS is not started for nothing
    if problem:
        pytest.skip(problem)
    seaweed_s3: SeaweedServer = request.getfixturevalue("seaweed_s3")
    bucket = seaweed_s3.bucket()
    proxy = FaultProxy(seaweed_s3.endpoint).start()
    found = Origin(seaweed_s3, bucket, proxy, tmp_path_factory.mktemp("sources"))
    try:
        found.upload("mlp", SIZES, seed=1)
        found.upload("swap", SWAP_SIZES, seed=1)
        for i, name in enumerate(SMALL):
            found.upload(name, SMALL_SIZES, seed=10 + i)
        yield found
    finally:
        proxy.stop()
        with contextlib.suppress(Exception):  # never mask the test's own failure
            seaweed_s3.delete_bucket(bucket.name)


# ------------------------------------------------------------------------------------------ nodes and pods


def infer_body(x: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}]}


def orphan_proof(argv: list[str]) -> list[str]:
    """`argv` run so that the kernel SIGTERMs it should this process die without cleaning up (setpriv --pdeathsig).

    Not ChildProcess's own_group, whose preexec_fn makes Python fork() rather than vfork(): this process holds gRPC
    channels (the kubelet's), and gRPC's fork handlers start a poller in the forked child that aborts it when the
    child closes its descriptors before exec ("epoll_wait error: Bad file descriptor"). Each child here is one
    process (unshare, nsenter and the launcher exec), so signalling it alone stops it all."""
    return ["setpriv", "--pdeathsig", "TERM", "--", *argv] if shutil.which("setpriv") else argv


def volume_id(pod_uid: str, volume: str) -> str:
    """An inline volume's id as the kubelet makes it: csi- and a sha256 of the pod and the volume."""
    return "csi-" + hashlib.sha256(f"{pod_uid}/{volume}".encode()).hexdigest()


@dataclass
class Pod:
    """A pod's CSI volume on a node, and its server once started."""

    node: Node
    name: str
    model: str
    volume_id: str
    target: Path
    server: ServerProcess | None = None

    @property
    def url(self) -> str:
        assert self.server is not None, f"pod {self.name} has no server"
        return self.server.url

    def infer(self, x: np.ndarray) -> tuple[np.ndarray, str]:
        """One V2 inference: the outputs and the version that computed them."""
        status, body = post_json(f"{self.url}/v2/models/{self.model}/infer", infer_body(x), timeout=30)
        assert status == 200, body
        return np.array(body["outputs"][0]["data"], dtype=np.float32), str(body["model_version"])

    def mapped(self) -> set[tuple[int, int, int]]:
        """(major, minor, inode) of every file the server maps."""
        assert self.server is not None
        return mapped_inodes(Path(f"/proc/{self.server.pid}/maps").read_text())


class Node:
    """A node: its mount namespace (held by `sleep`), its agent entered into it, its kubelet directory, and the
    kubelet's CSI stubs on the agent's socket. Paths inside the namespace are read through /proc/HOLDER/root."""

    def __init__(self, work: Path, name: str, catalog: Path, token: Path, env: dict[str, str]) -> None:
        self.name, self.catalog, self.token, self.env = name, catalog, token, env
        self.work = work / name
        self.root = self.work / "store"
        self.kubelet = self.work / "kubelet"
        (self.kubelet / "pods").mkdir(parents=True)
        self._socket_dir = Path(tempfile.mkdtemp(prefix="warmpod-node-"))  # a unix socket's path: 107 bytes at most
        self.socket = self._socket_dir / "csi.sock"
        self.holder = ChildProcess(orphan_proof(["unshare", "-m", "--propagation", "private", "sleep", "900"]),
                                   name=f"{name}'s namespace").spawn()  # fmt: skip
        ours = os.readlink("/proc/self/ns/mnt")
        wait_until(lambda: self._namespace() not in (None, ours), timeout=10, what=f"{name}'s mount namespace")
        self.agent: ChildProcess | None = None
        self.agent_args: tuple[str, ...] = ()
        self.url = ""
        self.pods: list[Pod] = []
        self._channel: grpc.Channel | None = None
        self.csi: Any = None

    def _namespace(self) -> str | None:
        try:
            return os.readlink(f"/proc/{self.holder.pid}/ns/mnt")
        except FileNotFoundError:
            return None

    # -- the agent
    def start_agent(self, *args: str | Path, max_bytes: str = NODE_BUDGET) -> Node:
        """`warmpod node` in the node's namespace (every node has the peer token; `args` add flags)."""
        self.agent_args = (
            "--root", str(self.root), "--tmpfs", "--max-bytes", max_bytes, "--catalog", str(self.catalog),
            "--csi-socket", str(self.socket), "--kubelet-dir", str(self.kubelet), "--node-id", self.name,
            "--host", "127.0.0.1", "--port", "0", "--peer-token-file", str(self.token), *map(str, args),
        )  # fmt: skip
        return self._start_agent()

    def _start_agent(self) -> Node:
        argv = orphan_proof(["nsenter", "-t", str(self.holder.pid), "-m", "--", *warmpod_cmd("node", *self.agent_args)])
        self.agent = ChildProcess(argv, name=f"warmpod node ({self.name})", ready=CSI_LISTENING, cwd=REPO,
                                  env=child_env(self.env), log_path=self.work / "agent.log")  # fmt: skip
        self.agent.start(AGENT_START_S)
        port = self.agent.first(LISTENING)
        assert port is not None
        self.url = f"http://127.0.0.1:{port[1].group(1)}"
        if self._channel is not None:
            self._channel.close()
        self._channel = grpc.insecure_channel(f"unix://{self.socket}")
        self.csi = csi_pb2_grpc.NodeStub(self._channel)  # type: ignore[no-untyped-call]
        return self

    def restart_agent(self) -> None:
        """SIGTERM (exit 0, nothing unmounted), then the same command again in the same namespace."""
        assert self.agent is not None
        self.agent.signal(signal.SIGTERM)
        assert self.agent.wait(30) == 0, self.agent.log_tail()
        self._start_agent()

    def events(self, name: str) -> list[dict[str, Any]]:
        """The agent's JSON log events called `name` (every run of it: the log file keeps them all)."""
        assert self.agent is not None
        lines = self.agent.log().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{") and f'"event": "{name}"' in line]

    def metrics(self) -> Scrape:
        return Scrape(self.url)

    def wait_ready(self) -> None:
        """Until the agent's /ready answers 200: every --preload model staged."""
        assert self.agent is not None
        wait_until(lambda: http("GET", self.url + "/ready", timeout=5)[0] == 200, timeout=AGENT_START_S,
                   what=f"{self.name}'s agent /ready", diagnostics=self.agent.log_tail)  # fmt: skip

    # -- the kubelet's calls
    def target(self, pod_uid: str, volume: str = "store") -> Path:
        """Where the kubelet publishes a pod's inline CSI volume (it makes the parent, the plugin the target)."""
        parent = self.kubelet / "pods" / pod_uid / "volumes" / "kubernetes.io~csi" / volume
        parent.mkdir(parents=True, exist_ok=True)
        return parent / "mount"

    def publish_call(self, pod: str, model: str, *, target: Path | None = None) -> Pod:
        """A pod's volume as the kubelet would publish it (the call is the test's to make: `request`)."""
        uid = f"{pod}-uid"
        return Pod(self, pod, model, volume_id(uid, "store"), target or self.target(uid))

    def publish(self, pod: str, model: str, *, namespace: str = TEAM) -> Pod:
        """NodePublishVolume for a new pod's volume (OK, or the test fails with the agent's log)."""
        found = self.publish_call(pod, model)
        try:
            self.csi.NodePublishVolume(self.request(found, namespace), timeout=PUBLISH_S)
        except grpc.RpcError as e:
            raise AssertionError(f"publish {model} for {pod}: {e}\n{self.log_tail()}") from None
        self.pods.append(found)
        return found

    def request(self, pod: Pod, namespace: str = TEAM) -> Any:
        """The kubelet's NodePublishVolume request for the pod's volume (a pod of `namespace`)."""
        return publish_request(pod.target, pod.volume_id, model=pod.model, namespace=namespace, pod=pod.name)

    def unpublish(self, pod: Pod) -> None:
        self.csi.NodeUnpublishVolume(unpublish_request(pod.target, pod.volume_id), timeout=30)

    # -- pods' servers
    def start_server(self, pod: Pod, *, wait: bool = True) -> ServerProcess:
        """The pod's container: `warmpod serve` on the volume, launched from the node's namespace into a mount
        namespace of its own whose root filesystem is read-only (its /tmp a writable directory of its own)."""
        tmp = self.work / "pods" / pod.name / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        launch = {
            "argv": warmpod_cmd("serve", "--store", pod.target, "--model", pod.model, "--port", "0"),
            "workdir": "/",
            # The volume is not bound again: the node's namespace, copied, already holds it as the agent bound it
            # (a runtime's recursive bind brings the same mounts); the read-only root covers it as well.
            "mounts": [{"path": str(tmp), "read_only": False}],
            "read_only_root": True,
            "isolate": True,
        }
        argv = orphan_proof(["nsenter", "-t", str(self.holder.pid), "-m", "--", sys.executable, "-m",
                             "tests.deploy.pod", "launch", json.dumps(launch)])  # fmt: skip
        pod.server = ServerProcess(argv, name=f"pod {pod.name} on {self.name}", log_path=tmp.parent / "server.log",
                                   env=child_env({"TMPDIR": str(tmp)}), cwd=REPO)  # fmt: skip
        if wait:
            pod.server.start(SERVER_READY_S)
        else:
            pod.server.spawn()
        return pod.server

    # -- what the node holds
    def inside(self, path: Path) -> Path:
        """`path` as the node's namespace sees it (its tmpfs, the agent's mounts)."""
        return Path(f"/proc/{self.holder.pid}/root{path}")

    def store_used(self) -> int:
        """Bytes the node store's tmpfs holds (its shared memory)."""
        st = os.statvfs(self.inside(self.root))
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def mounts_at(self, path: Path) -> int:
        return sum(1 for line in Path(f"/proc/{self.holder.pid}/mountinfo").read_text().splitlines()
                   if line.split()[4] == str(path))  # fmt: skip

    def versions(self, model: str) -> list[str]:
        folder = self.inside(self.root / model / "versions")
        return sorted(os.listdir(folder)) if folder.is_dir() else []

    def wait_versions(self, model: str, versions: list[str], *, timeout: float) -> None:
        wait_until(lambda: self.versions(model) == versions, timeout=timeout,
                   what=f"versions {versions} of {model} on {self.name}", diagnostics=self.log_tail)  # fmt: skip

    def staged_files(self, model: str) -> dict[str, str]:
        """sha256 of every file of the model's current version (its manifest left out)."""
        digests = tree_digests(self.inside(self.root / model / "current"))
        digests.pop("manifest.json", None)
        return digests

    def log_tail(self) -> str:
        return self.agent.log_tail() if self.agent is not None else f"{self.name}: no agent"

    def stop(self) -> None:
        for pod in self.pods:
            if pod.server is not None:
                pod.server.stop()
        if self._channel is not None:
            self._channel.close()
        if self.agent is not None:
            self.agent.stop()
        self.holder.stop()  # its namespace, and every mount in it, goes with its last process
        shutil.rmtree(self._socket_dir, ignore_errors=True)


class Cluster:
    """The nodes a test starts, over one origin, one catalog and one peer token; all stopped afterwards."""

    def __init__(self, work: Path, origin: Origin) -> None:
        self.work, self.origin = work, origin
        self.token = work / "peer-token"
        self.token.write_text(secrets.token_hex(32) + "\n")
        unreachable = f"http://127.0.0.1:{free_port()}/models/unreachable/"  # nothing listens there
        models: dict[str, Any] = {name: {"source": origin.uri(name), "namespaces": [TEAM]} for name in ("mlp", "swap")}
        models |= {name: {"source": origin.uri(name), "namespaces": ["*"]} for name in SMALL}
        models |= {"gone": {"source": origin.uri("gone"), "namespaces": ["*"]},  # nothing was uploaded there
                   "unreachable": {"source": unreachable, "namespaces": ["*"]}}  # fmt: skip
        self.catalog = work / "catalog.json"
        self.catalog.write_text(json.dumps({"models": models}))
        self.nodes: list[Node] = []

    def node(self, name: str) -> Node:
        node = Node(self.work, name, self.catalog, self.token, self.origin.env())
        self.nodes.append(node)
        return node

    def logs(self) -> str:
        tails = [n.log_tail() for n in self.nodes]
        tails += [p.server.log_tail() for n in self.nodes for p in n.pods if p.server is not None]
        return "\n".join(tails)

    def assert_nothing_mounted_here(self) -> None:
        """Every mount stayed in the nodes' namespaces: none under the test's directory in this one."""
        leaked = [p for p in mount_points() if p.startswith(str(self.work))]
        assert leaked == []

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture
def cluster(tmp_path: Path, origin: Origin, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    found = Cluster(tmp_path, origin)
    failed = request.session.testsfailed
    try:
        yield found
        if request.session.testsfailed > failed:  # the test's own report is in by now: show what the nodes said
            print(found.logs())
    finally:
        found.stop()


def range_bytes(header: str | None) -> int:
    """How many bytes a Range header `bytes=A-B` asks for (0 without one)."""
    if header is None:
        return 0
    first, _, last = header.removeprefix("bytes=").partition("-")
    return int(last) - int(first) + 1


def sample(seed: int = 0, rows: int = 1, width: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)


def expected(origin: Origin, model: str, x: np.ndarray) -> np.ndarray:
    return mlp_reference(origin.uploaded[model], x)


# ------------------------------------------------------------------------------------------ 1. one copy per node


def test_two_pods_on_one_node_share_one_copy_and_both_serve(cluster: Cluster, origin: Origin) -> None:
    node = cluster.node("node-a").start_agent()
    empty = node.store_used()
    # Two replicas scheduled onto the node together: the kubelet publishes both volumes at once, and both calls
    # wait for the one staging.
    first, second = node.publish_call("embedder-1", "mlp"), node.publish_call("embedder-2", "mlp")
    calls = [node.csi.NodePublishVolume.future(node.request(pod), timeout=PUBLISH_S) for pod in (first, second)]
    for call in calls:
        call.result()
    node.pods += [first, second]
    grown = node.store_used() - empty
    weights = mlp_bytes(SIZES)
    print(f"node store (tmpfs) grew by {grown} B for two pods; the model's weights are {weights} B")
    # One model (its weights, its small files, whole pages) and the two pods' reference records: not two models.
    assert weights <= grown < weights + (256 << 10)

    for pod in (first, second):
        pod_view = node.inside(pod.target)
        assert node.mounts_at(pod.target) == 1
        assert sorted(os.listdir(pod_view)) == ["mlp"]  # a store root holding this model only
        assert os.readlink(pod_view / "mlp" / "current") == "versions/1"
    servers = [node.start_server(pod, wait=False) for pod in (first, second)]  # started together, as a rollout
    for server in servers:
        server.wait_listening(SERVER_READY_S)
        server.wait_ready(SERVER_READY_S)
    assert node.store_used() - empty == grown  # serving copies nothing into the node store

    weights_file = os.stat(node.inside(node.root / "mlp" / "current" / "model.safetensors"))
    key = (os.major(weights_file.st_dev), os.minor(weights_file.st_dev), weights_file.st_ino)
    assert key in first.mapped() and key in second.mapped()  # both map the node store's one file
    namespaces = {os.readlink(f"/proc/{p.pid}/ns/mnt") for p in (node.holder, *servers)}
    assert len(namespaces) == 3 and os.readlink("/proc/self/ns/mnt") not in namespaces

    x = sample(rows=2)
    for pod in (first, second):
        out, version = pod.infer(x)
        assert version == "1"
        np.testing.assert_allclose(out.reshape(2, -1), expected(origin, "mlp", x), rtol=1e-4, atol=1e-4)

    scrape = node.metrics()
    asked = {result: scrape.value("warmpod_node_requests_total", result=result) for result in ("miss", "hit")}
    assert sum(v or 0 for v in asked.values()) == 2 and asked["miss"], asked  # a miss, and a miss or a hit
    assert scrape.value("warmpod_node_volumes_published") == 2
    source_bytes = sum(p.stat().st_size for p in origin.uploaded["mlp"].iterdir())
    assert scrape.value("warmpod_node_fetched_bytes_total", **{"from": "origin"}) == source_bytes  # once
    assert [e["model"] for e in node.events("published")] == ["mlp"]
    cluster.assert_nothing_mounted_here()


# ------------------------------------------------------------------------------------------ 2. a new pod, no download


def test_a_new_pod_where_the_model_is_staged_is_ready_without_an_origin_request(
    cluster: Cluster, origin: Origin
) -> None:
    node = cluster.node("node-a").start_agent()
    old = node.publish("embedder-old", "mlp")
    server = node.start_server(old)
    x = sample(seed=2)
    before, _ = old.infer(x)

    # The pod is deleted: its container stops (SIGTERM, nothing in flight: exit 0), then its volume is unpublished.
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0, server.log_tail()
    node.unpublish(old)
    assert not node.inside(old.target).exists() and node.mounts_at(old.target) == 0
    assert node.metrics().value("warmpod_node_volumes_published") == 0
    assert node.versions("mlp") == ["1"]  # still staged: nothing needed the room

    requests = origin.requests()
    started = time.monotonic()
    new = node.publish("embedder-new", "mlp")
    published = time.monotonic() - started
    node.start_server(new)
    ready = time.monotonic() - started
    print(f"new pod on the node: volume published in {published:.3f} s, server ready {ready:.2f} s after the "
          "publish call")  # fmt: skip
    assert origin.requests() == requests  # not a listing, not a HEAD, not a GET
    after, version = new.infer(x)
    assert version == "1"
    np.testing.assert_array_equal(after, before)
    assert node.metrics().value("warmpod_node_requests_total", result="hit") == 1
    cluster.assert_nothing_mounted_here()


# ------------------------------------------------------------------------------------------ 3. from a peer node


def test_a_second_node_stages_from_the_first_nodes_agent_and_falls_back_to_the_origin(
    cluster: Cluster, origin: Origin
) -> None:
    a = cluster.node("node-a").start_agent("--preload", "mlp")
    a.wait_ready()
    b = cluster.node("node-b").start_agent("--peers", a.url)
    source = tree_digests(origin.uploaded["mlp"])
    source_bytes = sum(p.stat().st_size for p in origin.uploaded["mlp"].iterdir())
    gets = origin.weight_gets("mlp")

    b.publish("embedder-b", "mlp")
    assert origin.weight_gets("mlp") == gets  # listed and HEADed at the origin, never read from it
    assert b.staged_files("mlp") == a.staged_files("mlp") == source
    manifest = "current/manifest.json"
    b_source, a_source = (json.loads(n.inside(n.root / "mlp" / manifest).read_text())["source"] for n in (b, a))
    assert b_source == a_source  # published as the origin's version, with the origin's identity
    [staged] = b.events("staged")
    assert staged["peer"] == f"{a.url}/peer/v1/models/mlp/versions/1" and staged["peer_error"] is None
    assert staged["origin_bytes"] == 0
    scrape = b.metrics()
    assert scrape.value("warmpod_node_fetched_bytes_total", **{"from": "peer"}) == source_bytes
    assert scrape.value("warmpod_node_fetched_bytes_total", **{"from": "origin"}) == 0

    # Node C's peer is cut off mid-transfer: a proxy in front of node A closes every answer after 1 MiB, so the
    # small files and the header probe come through and the weights' body stops a fifth of the way.
    cut = FaultProxy(a.url, reset_fraction=1.0, reset_after_bytes=1 << 20).start()
    try:
        c = cluster.node("node-c").start_agent("--peers", cut.url)
        pod = c.publish("embedder-c", "mlp")
    finally:
        cut.stop()
    cut_short = [r.path.rsplit("/", 1)[1] for r in cut.requests.records() if range_bytes(r.range) > 1 << 20]
    assert cut_short == ["model.safetensors"], [(r.path, r.range) for r in cut.requests.records()]
    [staged] = c.events("staged")
    assert staged["peer"] == f"{cut.url}/peer/v1/models/mlp/versions/1"
    assert staged["peer_error"] is not None and "model.safetensors" in staged["peer_error"]
    assert staged["origin_bytes"] > 0 and origin.weight_gets("mlp") > gets  # the rest came from the origin
    print(f"node C's peer cut off: {staged['peer_bytes']} B from the peer, {staged['origin_bytes']} B from the "
          f"origin ({staged['peer_error']})")  # fmt: skip
    # Nothing half-written in sight: one complete version, the origin's bytes, nothing left in staging, and the
    # pod's volume shows just that.
    assert c.staged_files("mlp") == source and c.versions("mlp") == ["1"]
    staging = c.inside(c.root / "mlp" / "staging")
    assert not staging.exists() or [p for p in staging.rglob("*") if p.is_file()] == []
    seen = c.inside(pod.target) / "mlp"
    assert sorted(os.listdir(seen / "versions")) == ["1"] and os.readlink(seen / "current") == "versions/1"
    c.start_server(pod)
    x = sample(seed=3)
    out, _ = pod.infer(x)
    np.testing.assert_allclose(out.reshape(1, -1), expected(origin, "mlp", x), rtol=1e-4, atol=1e-4)
    cluster.assert_nothing_mounted_here()


def test_a_peer_serving_other_bytes_than_its_manifest_is_refused_and_the_origin_serves_the_load(
    cluster: Cluster, origin: Origin
) -> None:
    liar = cluster.node("node-l").start_agent("--preload", "mlp")
    liar.wait_ready()
    weights = liar.inside(liar.root / "mlp" / "versions" / "1" / "model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-64] ^= 0x01  # one bit of a weight, under the manifest's sha256: same size, same header
    weights.write_bytes(bytes(data))
    gets = origin.weight_gets("mlp")

    d = cluster.node("node-d").start_agent("--peers", liar.url)
    pod = d.publish("embedder-d", "mlp")
    [staged] = d.events("staged")
    assert staged["peer"] == f"{liar.url}/peer/v1/models/mlp/versions/1"
    assert staged["peer_error"] == (
        f"model.safetensors: its bytes do not match its manifest (sha256 {sha256_file(weights)})"
    )
    assert origin.weight_gets("mlp") > gets  # the weights came from the origin after all
    assert d.staged_files("mlp") == tree_digests(origin.uploaded["mlp"]) and d.versions("mlp") == ["1"]
    staging = d.inside(d.root / "mlp" / "staging")
    assert not staging.exists() or [p for p in staging.rglob("*") if p.is_file()] == []
    assert os.readlink(d.inside(pod.target) / "mlp" / "current") == "versions/1"
    cluster.assert_nothing_mounted_here()


# ------------------------------------------------------------------------------------------ 4. a new version


def test_a_new_version_at_the_origin_is_hot_swapped_on_both_nodes_with_no_failed_request(
    cluster: Cluster, origin: Origin
) -> None:
    a = cluster.node("node-a").start_agent("--watch", "1")
    b = cluster.node("node-b").start_agent("--watch", "1", "--peers", a.url)
    pods = [a.publish("embedder-a", "swap"), b.publish("embedder-b", "swap")]
    for server in [node.start_server(pod, wait=False) for node, pod in ((a, pods[0]), (b, pods[1]))]:
        server.wait_listening(SERVER_READY_S)
        server.wait_ready(SERVER_READY_S)
    x = sample(seed=4)
    v1 = expected(origin, "swap", x)[0]
    loads = [LoadThread(f"{pod.url}/v2/models/swap/infer", infer_body(x), workers=1, max_requests=4000,
                        max_seconds=SWAP_S, pause_s=0.02).start() for pod in pods]  # fmt: skip

    def answered_by(version: str, load: LoadThread) -> int:
        return sum(1 for r in list(load.results) if r[3] is not None and r[3].get("model_version") == version)

    try:
        wait_until(lambda: all(answered_by("1", load) >= 10 for load in loads), timeout=30,
                   what="10 answers from version 1 on each pod", diagnostics=cluster.logs)  # fmt: skip
        uploaded_at = time.monotonic()
        origin.upload("swap", SWAP_SIZES, seed=2)  # a user uploads new weights
        wait_until(lambda: all(answered_by("2", load) >= 10 for load in loads), timeout=SWAP_S,
                   what="10 answers from version 2 on each pod", diagnostics=cluster.logs)  # fmt: skip
        print(f"new upload -> 10 answers from version 2 on both nodes: {time.monotonic() - uploaded_at:.2f} s")
    finally:
        results = [load.stop() for load in loads]

    v2 = expected(origin, "swap", x)[0]
    assert float(np.abs(v2 - v1).max()) > 1e-2, "version 2's outputs should differ from version 1's"
    for pod, answers in zip(pods, results, strict=True):
        failed = [(r[2], r[3]) for r in answers if r[2] != 200]
        assert failed == [], f"{pod.name}: {len(failed)} of {len(answers)} requests failed: {failed[:5]}"
        by_version: dict[str, int] = {}
        for _, _, _, body, _ in answers:
            out = np.array(body["outputs"][0]["data"], dtype=np.float32)
            np.testing.assert_allclose(out, {"1": v1, "2": v2}[body["model_version"]], rtol=1e-4, atol=1e-4)
            by_version[body["model_version"]] = by_version.get(body["model_version"], 0) + 1
        print(f"{pod.name} on {pod.node.name}: {len(answers)} requests, all 200, by version {by_version}")
    for node in (a, b):
        assert os.readlink(node.inside(node.root / "swap" / "current")) == "versions/2"
        # Version 1 goes once its server has swapped and unmapped it (the agent collects after each --watch round).
        node.wait_versions("swap", ["2"], timeout=15)
    staged = [e for e in b.events("staged") if e["model"] == "swap"][-1]  # version 2: from A if A had it already
    print(f"node B staged version 2 with {staged['peer_bytes']} B from its peer, {staged['origin_bytes']} B from the "
          "origin")  # fmt: skip
    cluster.assert_nothing_mounted_here()


# ------------------------------------------------------------------------------------------ 5. the budget


def over_budget_message(origin: Origin, node: Node, model: str, budget: int, held: list[str]) -> str:
    """What the agent says when `model` cannot fit even after evicting everything not in use."""
    need = sum(p.stat().st_size for p in origin.uploaded[model].iterdir())
    used = sum(m.bytes for m in list_store(node.inside(node.root)))
    return (
        f"model {model!r} needs {format_bytes(need)}, but the node budget --max-bytes {format_bytes(budget)} holds "
        f"{format_bytes(used)} and evicting everything not in use frees only 0 B (in use or staging: "
        f"{', '.join(held)}); raise --max-bytes or wait for pods to release a model"
    )


def test_eviction_never_takes_a_mapped_or_published_version_and_an_over_budget_publish_is_resource_exhausted(
    cluster: Cluster, origin: Origin
) -> None:
    one = mlp_bytes(SMALL_SIZES) + (64 << 10)  # a small model and its small files, in whole pages
    budget = (3 * one + one // 2) // 4096 * 4096  # three fit, a fourth does not
    node = cluster.node("node-e").start_agent(max_bytes=str(budget))
    p1 = node.publish("pod-1", "s1")
    server = node.start_server(p1)
    p2 = node.publish("pod-2", "s2")
    p3 = node.publish("pod-3", "s3")
    assert sorted(m.name for m in list_store(node.inside(node.root))) == ["s1", "s2", "s3"]
    # Pod 3 is gone; pod 1's volume is torn down while its server still runs (it maps s1's files). The agent
    # restarts, so no model counts as just handed out (for HANDOFF_GRACE_S, 60 s, longer than this test): s1 is in
    # use only as mapped, s2 only as published, s3 not at all.
    node.unpublish(p3)
    node.unpublish(p1)
    node.restart_agent()
    assert node.events("tmpfs_kept") and server.running

    node.publish("pod-4", "s4")  # room for s4: s3 goes, s1 and s2 stay
    assert [(e["model"], e["whole_model"]) for e in node.events("evicted")] == [("s3", True)]
    assert sorted(m.name for m in list_store(node.inside(node.root))) == ["s1", "s2", "s4"]
    assert node.metrics().value("warmpod_node_evictions_total") == 1

    p5 = node.publish_call("pod-5", "s5")  # nothing left that may go
    error = rpc_error(lambda: node.csi.NodePublishVolume(node.request(p5), timeout=PUBLISH_S))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == over_budget_message(origin, node, "s5", budget, ["s1", "s2", "s4"])
    assert not node.inside(p5.target).exists()
    assert sorted(m.name for m in list_store(node.inside(node.root))) == ["s1", "s2", "s4"]
    assert node.metrics().value("warmpod_node_evictions_total") == 1

    x = sample(seed=5)
    out, version = p1.infer(x)  # s1's server still serves its mapped weights
    assert version == "1"
    np.testing.assert_allclose(out.reshape(1, -1), expected(origin, "s1", x), rtol=1e-4, atol=1e-4)
    assert node.inside(p2.target).is_dir() and node.mounts_at(p2.target) == 1
    cluster.assert_nothing_mounted_here()


# ------------------------------------------------------------------------------------------ 6. the kubelet's bad calls


def test_the_kubelets_bad_calls_through_the_real_agent(cluster: Cluster, origin: Origin) -> None:
    node = cluster.node("node-a").start_agent()
    catalog = json.loads(cluster.catalog.read_text())["models"]

    def refused(pod: Pod, namespace: str = TEAM) -> grpc.RpcError:
        error = rpc_error(lambda: node.csi.NodePublishVolume(node.request(pod, namespace), timeout=PUBLISH_S))
        assert not pod.target.exists() and not node.inside(pod.target).exists(), pod.target  # nothing made
        return error

    error = refused(node.publish_call("pod-llama", "llama"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == (
        f"model 'llama' is not in this node's catalog (it lists: {', '.join(sorted(catalog))}); ask the cluster admin "
        "to add it to the warmpod catalog ConfigMap"
    )
    error = refused(node.publish_call("pod-b", "mlp"), namespace="team-b")
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "namespace 'team-b' may not mount model 'mlp' (the catalog allows: team-a)"
    for model in ("gone", "unreachable"):  # nothing at the source's prefix; nothing listening at its address
        error = refused(node.publish_call(f"pod-{model}", model))
        assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
        source = catalog[model]["source"]
        assert error.details() == f"model {model!r}: the catalog's source cannot be read: {source}: not found"
    outside = node.publish_call("pod-out", "mlp", target=node.kubelet / "plugins" / "x" / "mount")
    escape = node.publish_call("pod-esc", "mlp", target=node.kubelet / "pods" / ".." / "escape" / "mount")
    for pod in (outside, escape):
        error = refused(pod)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == (
            f"target_path {str(pod.target)!r} (resolved: {os.path.realpath(pod.target)}) is not under the kubelet's "
            f"pods directory {node.kubelet / 'pods'}/: warmpod mounts only into pods' volume directories (is "
            "--kubelet-dir the kubelet's --root-dir?)"
        )
    assert node.metrics().value("warmpod_node_volumes_published") == 0
    assert list_store(node.inside(node.root)) == []  # nothing staged by any of them

    pod = node.publish_call("pod-ok", "mlp")
    for _ in range(3):
        node.csi.NodePublishVolume(node.request(pod), timeout=PUBLISH_S)
    assert node.mounts_at(pod.target) == 1
    assert sorted(os.listdir(node.inside(node.root / ".volumes"))) == [f"{pod.volume_id}.json"]
    for _ in range(2):
        node.unpublish(pod)
    assert node.mounts_at(pod.target) == 0 and not node.inside(pod.target).exists()
    assert os.listdir(node.inside(node.root / ".volumes")) == []
    assert node.metrics().value("warmpod_node_volumes_published") == 0
    cluster.assert_nothing_mounted_here()
