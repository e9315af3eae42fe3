"""`warmpod node` as the DaemonSet runs it: bad flags (exit 2, the flag named), its HTTP port (/healthz, /ready,
/metrics read with prometheus_client's parser), the CSI socket, SIGTERM (exit 0, nothing unmounted) and a restart
that finds the tmpfs, the views and the models where they were.

Started as root, the agent runs in a private mount namespace (`unshare -m`), so its bind mounts never reach the
machine's; otherwise mount(2) is refused and views are symlinks, which the agent says."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.kit.clients import http
from tests.kit.metrics import Scrape
from tests.kit.models import write_mlp
from tests.kit.procs import ChildProcess, wait_until
from tests.kit.warmpod import REPO, child_env, error_line, run_warmpod, warmpod_cmd
from tests.node.conftest import mount_namespace_problem, publish_request
from warmpod.node import csi_pb2, csi_pb2_grpc
from warmpod.node.cli import main
from warmpod.node.ls import list_store

LISTENING = re.compile(r'"event": "http_listening".*"port": (\d+)')


def catalog_file(tmp_path: Path) -> Path:
    """Model a (a small MLP, every namespace) and model gone (its source does not exist)."""
    source = write_mlp(tmp_path / "sources" / "a", (64, 256, 10))
    models = {"a": {"source": str(source), "namespaces": ["*"]},
              "gone": {"source": str(tmp_path / "nowhere"), "namespaces": ["*"]}}  # fmt: skip
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"models": models}))
    return path


# ---------------------------------------------------------------- bad flags


def bad_flags(tmp_path: Path) -> list[tuple[list[str], str]]:
    catalog = str(catalog_file(tmp_path))
    (tmp_path / "not-json.json").write_text("{models: }")
    (tmp_path / "no-source.json").write_text('{"models": {"a": {"namespaces": ["*"]}}}')
    (tmp_path / "a-file").write_text("")
    (tmp_path / "empty-token").write_text("\n")
    c = ["--catalog", catalog]
    return [
        ([], "the following arguments are required: --catalog"),
        ([*c, "--max-bytes", "lots"], "argument --max-bytes: not a size: 'lots' (examples: 4096, 16MiB, 1GiB)"),
        ([*c, "--max-bytes", "0"], "--max-bytes must be positive, got 0"),
        (["--catalog", str(tmp_path / "missing.json")], f"--catalog {tmp_path}/missing.json: cannot read: No such"),
        (["--catalog", str(tmp_path / "not-json.json")], f"--catalog {tmp_path}/not-json.json: not JSON"),
        (["--catalog", str(tmp_path / "no-source.json")],
         f"--catalog {tmp_path}/no-source.json: model 'a': \"source\" must be the loader's SOURCE"),
        ([*c, "--preload", "a", "llama"], "--preload llama: not in the catalog (it lists: a, gone)"),
        ([*c, "--tmpfs"], "--tmpfs needs --max-bytes (the size of the tmpfs)"),
        ([*c, "--huge"], "--huge applies to the agent's own tmpfs: add --tmpfs (and --max-bytes)"),
        ([*c, "--watch", "0"], "argument --watch: must be at least 0.001, got 0"),
        ([*c, "--publish-timeout", "nan"], "argument --publish-timeout: must be at least 0.001, got nan"),
        ([*c, "--port", "70000"], "argument --port: must be in 0-65535 (0: any free port), got 70000"),
        ([*c, "--peers", "ftp://peer"], "--peers ftp://peer: expected an http:// or https:// URL of a peer agent's"),
        ([*c, "--peers", "http://peer:8479"], "--peers needs --peer-token-file (peers only answer requests that"),
        ([*c, "--peer-token-file", str(tmp_path / "no-token")], f"--peer-token-file {tmp_path}/no-token: cannot read"),
        ([*c, "--peer-token-file", str(tmp_path / "empty-token")], "--peer-token-file"),
        ([*c, "--root", str(tmp_path / "a-file")], f"--root {tmp_path}/a-file: not a directory"),
        ([*c, "--node-id", ""], "--node-id is empty: give the node's name"),
    ]  # fmt: skip


@pytest.mark.unit
def test_bad_flags_exit_2_naming_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in bad_flags(tmp_path):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own checks
            code = int(e.code or 0)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert "warmpod node: error: " in err and message in err, (argv, err)
    assert not (tmp_path / "root").exists()


@pytest.mark.process
def test_the_command_refuses_a_bad_catalog(tmp_path: Path) -> None:
    proc = run_warmpod("node", "--catalog", tmp_path / "missing.json", "--root", tmp_path / "root")
    assert proc.returncode == 2
    assert error_line(proc, "warmpod node").startswith(f"warmpod node: error: --catalog {tmp_path}/missing.json:")


# ---------------------------------------------------------------- the running agent


class NodeProcess(ChildProcess):
    """`warmpod node --port 0 ...` in a child, started once it listens: `url` is its HTTP port. `enter`: the pid
    of a process whose mount namespace it joins (nsenter); `unprivileged`: in a user namespace of its own, where
    mount(2) is refused; otherwise a private mount namespace of its own when root."""

    def __init__(self, tmp_path: Path, *args: str | Path, enter: int | None = None, unprivileged: bool = False) -> None:
        self.root = tmp_path / "root"
        if enter is not None:
            prefix = ["nsenter", "-t", str(enter), "-m", "--"]
        elif unprivileged:
            prefix = ["unshare", "--user", "--map-root-user"]
        elif os.geteuid() == 0:
            problem = mount_namespace_problem()
            if problem:
                pytest.skip(f"root without a private mount namespace would mount on this machine: {problem}")
            prefix = ["unshare", "-m", "--propagation", "private"]
        else:
            prefix = []
        argv = [*prefix, *warmpod_cmd("node", "--root", self.root, "--port", "0", "--host", "127.0.0.1", *args)]
        super().__init__(argv, name="warmpod node", ready=LISTENING, env=child_env(), cwd=REPO)
        self.url = ""

    def start(self, timeout: float = 60) -> NodeProcess:
        super().start(timeout)
        assert self.match is not None
        self.url = f"http://127.0.0.1:{self.match.group(1)}"
        return self

    def get(self, path: str) -> tuple[int, Any]:
        status, _, body = http("GET", self.url + path, timeout=10)
        return status, json.loads(body)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(line) for _, line in self.lines if line.startswith("{") and f'"event": "{name}"' in line]


@pytest.fixture
def nodes() -> Iterator[list[NodeProcess]]:
    """Agents a test starts (append them); every one stopped afterwards."""
    started: list[NodeProcess] = []
    yield started
    for node in started:
        node.stop()


@pytest.mark.process
def test_health_readiness_metrics_csi_and_sigterm(tmp_path: Path, nodes: list[NodeProcess]) -> None:
    catalog = catalog_file(tmp_path)
    socket_dir = Path(tempfile.mkdtemp(prefix="warmpod-node-"))  # a unix socket's path has at most 107 bytes
    try:
        node = NodeProcess(tmp_path, "--catalog", catalog, "--preload", "a", "gone", "--max-bytes", "1MiB",
                           "--csi-socket", socket_dir / "csi.sock", "--node-id", "node-7")  # fmt: skip
        nodes.append(node.start())
        assert node.get("/healthz") == (200, {"status": "alive"})

        def gone_failed() -> bool:
            return bool(node.get("/ready")[1]["failed"])

        wait_until(gone_failed, timeout=30, what="the failed preload on /ready", diagnostics=node.log_tail)
        status, ready = node.get("/ready")
        assert status == 503 and ready["ready"] is False and ready["preload"] == ["a", "gone"]
        assert list(ready["failed"]) == ["gone"]
        assert ready["failed"]["gone"].startswith("model 'gone': the catalog's source cannot be read:")

        scrape = Scrape(node.url)
        [a] = list_store(node.root)  # a private mount namespace shares the files: only mounts stay inside
        assert scrape.value("warmpod_node_budget_bytes") == 1 << 20
        assert scrape.value("warmpod_node_requests_total", result="miss") == 0
        assert scrape.value("warmpod_node_fetched_bytes_total", **{"from": "origin"}) == sum(
            p.stat().st_size for p in (tmp_path / "sources" / "a").iterdir()
        )
        assert scrape.value("warmpod_node_fetched_bytes_total", **{"from": "peer"}) == 0
        assert scrape.value("warmpod_node_staging_failures_total", kind="source_missing") == 1
        assert scrape.value("warmpod_node_volumes_published") == 0
        assert scrape.value("warmpod_node_evictions_total") == 0
        assert scrape.value("warmpod_node_model_bytes", model="a") == a.bytes

        with grpc.insecure_channel(f"unix://{socket_dir / 'csi.sock'}") as channel:
            node_stub = csi_pb2_grpc.NodeStub(channel)  # type: ignore[no-untyped-call]
            identity = csi_pb2_grpc.IdentityStub(channel)  # type: ignore[no-untyped-call]
            info = node_stub.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10)
            plugin = identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10)
        assert (info.node_id, plugin.name) == ("node-7", "node.warmpod.dev")

        node.signal(15)
        assert node.wait(30) == 0
        [stopped] = node.events("stopped")
        assert stopped["unmounted"].startswith("nothing")
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)

    again = NodeProcess(tmp_path, "--catalog", catalog, "--preload", "a")
    nodes.append(again.start())
    wait_until(lambda: again.get("/ready")[0] == 200, timeout=30, what="/ready", diagnostics=again.log_tail)
    assert again.get("/ready")[1] == {"ready": True, "preload": ["a"], "pending": [], "failed": {}}


@pytest.mark.process
def test_where_mount_is_refused_the_agent_says_so_and_uses_the_directory(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no user namespace here: {probe.stderr.strip()}")
    node = NodeProcess(tmp_path, "--catalog", catalog_file(tmp_path), "--preload", "a", "--tmpfs", "--max-bytes",
                       "1MiB", unprivileged=True)  # fmt: skip
    nodes.append(node.start())
    wait_until(lambda: node.get("/ready")[0] == 200, timeout=30, what="/ready", diagnostics=node.log_tail)
    [tmpfs] = node.events("tmpfs_not_mounted")
    assert tmpfs["reason"].startswith("mount(2) not permitted") and tmpfs["using"] == "the directory as it is"
    [views] = node.events("views_not_mounted")
    assert views["using"] == "symlinks"
    view = node.root / ".views" / "a" / "a"
    assert os.readlink(view) == "../../a" and (view / "current" / "model.safetensors").is_file()


@pytest.mark.namespace
def test_sigterm_unmounts_nothing_and_a_restart_keeps_tmpfs_views_and_volumes(
    tmp_path: Path, nodes: list[NodeProcess], namespaced: None
) -> None:
    """The agent in a namespace held by another process, so what it leaves mounted can be seen after it exits: a
    pod's volume published through the CSI socket (the kubelet's call), SIGTERM, and a second agent that finds the
    tmpfs, the views and the reference where they were."""
    holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "300"])
    socket_dir = Path(tempfile.mkdtemp(prefix="warmpod-node-"))
    try:
        catalog = catalog_file(tmp_path)
        mountinfo = Path(f"/proc/{holder.pid}/mountinfo")
        wait_until(lambda: mountinfo.read_text() != Path("/proc/self/mountinfo").read_text(), timeout=10,
                   what="the holder's namespace")  # fmt: skip
        root, kubelet = tmp_path / "root", tmp_path / "kubelet"
        args = ("--catalog", catalog, "--tmpfs", "--max-bytes", "1MiB", "--csi-socket", socket_dir / "csi.sock",
                "--kubelet-dir", kubelet, "--node-id", "node-7")  # fmt: skip
        nodes.append(NodeProcess(tmp_path, *args, enter=holder.pid).start())
        target = kubelet / "pods" / "uid-1" / "volumes" / "kubernetes.io~csi" / "csi-1" / "mount"
        inside = Path(f"/proc/{holder.pid}/root")
        (inside / str(target.parent).lstrip("/")).mkdir(parents=True)
        publish = publish_request(target, "csi-1", model="a", namespace="team-a")
        with grpc.insecure_channel(f"unix://{socket_dir / 'csi.sock'}") as channel:
            stub = csi_pb2_grpc.NodeStub(channel)  # type: ignore[no-untyped-call]
            stub.NodePublishVolume(publish, timeout=30)

        def mounted() -> dict[str, int]:
            points = [line.split()[4] for line in mountinfo.read_text().splitlines()]
            return {name: points.count(str(path)) for name, path in
                    {"tmpfs": root, "view": root / ".views" / "a" / "a", "pod": target}.items()}  # fmt: skip

        assert mounted() == {"tmpfs": 1, "view": 1, "pod": 1}
        assert (inside / str(target).lstrip("/") / "a" / "current" / "model.safetensors").is_file()
        nodes[0].signal(15)
        assert nodes[0].wait(30) == 0
        assert mounted() == {"tmpfs": 1, "view": 1, "pod": 1}  # the pod keeps its model

        nodes.append(NodeProcess(tmp_path, *args, enter=holder.pid).start())
        assert [e["root"] for e in nodes[1].events("tmpfs_kept")] == [str(root)]
        assert mounted() == {"tmpfs": 1, "view": 1, "pod": 1}  # nothing mounted twice
        assert Scrape(nodes[1].url).value("warmpod_node_volumes_published") == 1
    finally:
        holder.kill()
        holder.wait()
        shutil.rmtree(socket_dir, ignore_errors=True)
