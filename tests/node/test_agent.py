"""The node agent in this process, on real files: staging with the loader from the catalog, one staging per model,
preloads, references across a restart, what is in use (/proc maps by device:inode), LRU eviction under a budget that
never takes a mapped or referenced version, and the errors a pod's volume gets. Views are symlinks here
(mount_views=False); the mounts themselves are tested in test_agent_mounts.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client import CollectorRegistry

from tests.kit.models import write_mlp
from warmpod.node.agent import (
    HANDOFF_GRACE_S,
    Eviction,
    NodeAgent,
    NodeConfig,
    eviction_order,
    mapped_inodes,
    plan_eviction,
)
from warmpod.node.catalog import parse_catalog
from warmpod.node.errors import NamespaceDenied, NotInCatalog, OverBudget, SourceMissing, StagingTimeout
from warmpod.node.ls import ModelListing, VersionListing, format_bytes, list_store
from warmpod.store import current_version, open_model, version_dir

SIZES = (64, 256, 10)  # ~77 KiB of weights: three fit 240 KiB, two fit 160 KiB
T = TypeVar("T")


class Clock:
    """The agent's clock, moved by hand: a model handed out stays in use for HANDOFF_GRACE_S."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def pass_grace(self) -> None:
        self.now += HANDOFF_GRACE_S + 1


class Log:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: str, **fields: Any) -> None:
        self.events.append({"event": event, **fields})

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event]


class Node:
    """An agent on `root` with a catalog of generated models under `sources`, run in one event loop per test."""

    def __init__(self, tmp_path: Path, models: dict[str, dict[str, Any]], **config: Any) -> None:
        self.root, self.sources = tmp_path / "root", tmp_path / "sources"
        self.catalog = {"models": models}
        self.config = {"mount_views": False, **config}
        self.clock, self.log, self.registry = Clock(), Log(), CollectorRegistry()

    def agent(self, **changes: Any) -> NodeAgent:
        config = NodeConfig(root=self.root, catalog=parse_catalog(json.dumps(self.catalog)), **self.config | changes)
        self.registry = CollectorRegistry()
        return NodeAgent(config, self.registry, log=self.log, clock=self.clock)

    def metric(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


def model(sources: Path, name: str, seed: int = 0, namespaces: tuple[str, ...] = ("*",)) -> dict[str, Any]:
    """A catalog entry for a freshly written MLP directory."""
    path = write_mlp(sources / name, SIZES, seed=seed)
    return {"source": str(path), "namespaces": list(namespaces)}


def source_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture
def node(tmp_path: Path) -> Node:
    sources = tmp_path / "sources"
    models = {name: model(sources, name, seed) for seed, name in enumerate(("a", "b", "c"))}
    models["private"] = model(sources, "private", 9, namespaces=("team-a",))
    models["gone"] = {"source": str(sources / "nowhere"), "namespaces": ["*"]}
    return Node(tmp_path, models)


def run(agent: NodeAgent, body: Callable[[NodeAgent], Awaitable[T]]) -> T:
    """Start the agent, run `body` with it, close it: one event loop."""

    async def main() -> T:
        async with agent:
            return await body(agent)

    return asyncio.run(main())


class Mapper:
    """A child process that maps a file read-only (as a server maps a version) until stopped."""

    def __init__(self, path: Path) -> None:
        code = ("import mmap, sys; f = open(sys.argv[1], 'rb'); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)"
                "; f.close(); print('mapped', flush=True); sys.stdin.read()")  # fmt: skip
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "mapped\n"

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(10) == 0


@pytest.fixture
def mapper() -> Iterator[Callable[[Path], Mapper]]:
    started: list[Mapper] = []

    def start(path: Path) -> Mapper:
        started.append(Mapper(path))
        return started[-1]

    yield start
    for m in started:
        if m.proc.poll() is None:
            m.proc.kill()
            m.proc.wait()


# ---------------------------------------------------------------- staging


@pytest.mark.unit
def test_a_model_is_staged_on_demand_once_then_hit(node: Node) -> None:
    async def body(agent: NodeAgent) -> tuple[Path, Path]:
        return await agent.ensure_model("a", "team-x"), await agent.ensure_model("a", "team-y")

    first, second = run(node.agent(), body)
    assert first == second == node.root / ".views" / "a"
    staged = open_model(first, "a")  # the view is a store root holding the model
    assert staged.version == "1" and set(staged.tensor_index) == {"layers.0.weight", "layers.0.bias",
                                                                  "layers.1.weight", "layers.1.bias"}  # fmt: skip
    assert [m.name for m in list_store(node.root)] == ["a"]
    assert node.metric("warmpod_node_requests_total", result="miss") == 1
    assert node.metric("warmpod_node_requests_total", result="hit") == 1
    assert node.metric("warmpod_node_fetched_bytes_total", **{"from": "origin"}) == source_bytes(node.sources / "a")
    assert node.metric("warmpod_node_fetched_bytes_total", **{"from": "peer"}) == 0
    assert node.metric("warmpod_node_model_bytes", model="a") == list_store(node.root)[0].bytes


@pytest.mark.unit
def test_concurrent_requests_for_a_model_share_one_staging(node: Node) -> None:
    async def body(agent: NodeAgent) -> list[Path]:
        return await asyncio.gather(*(agent.ensure_model("a", None) for _ in range(5)))

    views = run(node.agent(), body)
    assert set(views) == {node.root / ".views" / "a"}
    # One load: a second one would have failed on the model's writer lock, or published version 2.
    assert [e["version"] for e in node.log.named("published")] == ["1"]
    assert node.metric("warmpod_node_requests_total", result="miss") == 5
    assert node.metric("warmpod_node_fetched_bytes_total", **{"from": "origin"}) == source_bytes(node.sources / "a")


@pytest.mark.unit
def test_preloads_are_staged_at_start_and_then_ready(node: Node) -> None:
    async def body(agent: NodeAgent) -> bool:
        before = agent.ready
        while not agent.ready:
            await asyncio.sleep(0.01)
        return before

    assert run(node.agent(preload=("a", "b")), body) is False
    assert {m.name: m.current for m in list_store(node.root)} == {"a": "1", "b": "1"}
    assert node.metric("warmpod_node_requests_total", result="miss") == 0  # preloading is not a pod's request


@pytest.mark.unit
def test_a_preload_that_fails_keeps_the_agent_unready_and_says_why(node: Node) -> None:
    async def body(agent: NodeAgent) -> dict[str, str]:
        while not agent.preload.failed:
            await asyncio.sleep(0.01)
        assert not agent.ready
        return agent.preload.failed

    failed = run(node.agent(preload=("a", "gone")), body)
    assert list(failed) == ["gone"] and "model 'gone': the catalog's source cannot be read" in failed["gone"]
    assert current_version(node.root, "a") == "1"


@pytest.mark.unit
def test_a_missing_source_is_source_missing(node: Node) -> None:
    with pytest.raises(SourceMissing) as info:
        run(node.agent(), lambda agent: agent.ensure_model("gone", None))
    assert str(info.value).startswith("model 'gone': the catalog's source cannot be read:")
    assert str(node.sources / "nowhere") in str(info.value) and "not found" in str(info.value)
    assert info.value.grpc_status == "NOT_FOUND"
    assert node.metric("warmpod_node_staging_failures_total", kind="source_missing") == 1
    assert list_store(node.root) == []


@pytest.mark.unit
def test_the_catalog_decides_what_a_namespace_may_have(node: Node) -> None:
    with pytest.raises(NotInCatalog) as missing:
        run(node.agent(), lambda agent: agent.ensure_model("llama", "team-a"))
    assert "model 'llama' is not in this node's catalog (it lists: a, b, c, gone, private)" in str(missing.value)
    with pytest.raises(NamespaceDenied) as denied:
        run(node.agent(), lambda agent: agent.ensure_model("private", "team-b"))
    assert str(denied.value) == "namespace 'team-b' may not mount model 'private' (the catalog allows: team-a)"
    assert list_store(node.root) == []
    assert run(node.agent(), lambda agent: agent.ensure_model("private", "team-a")) == node.root / ".views" / "private"


@pytest.mark.emulator
def test_past_the_publish_timeout_staging_goes_on(node: Node, http_server: Any, fault_proxy: Any) -> None:
    proxy = fault_proxy(http_server(node.sources).url, delay_s=0.5)  # every ranged GET waits: staging takes > 0.5 s
    node.catalog["models"]["slow"] = {"source": f"{proxy.url}/a/", "namespaces": ["*"]}

    async def body(agent: NodeAgent) -> Path:
        with pytest.raises(StagingTimeout) as info:
            await agent.ensure_model("slow", None)
        assert "model 'slow' is not staged yet after 0.1 s (--publish-timeout)" in str(info.value)
        assert info.value.grpc_status == "DEADLINE_EXCEEDED"
        # the staging the timed-out call started goes on to its end (its "published" event: the version is
        # visible a moment before the staging task has logged it and made the view)
        while not node.log.named("published"):
            await asyncio.sleep(0.02)
        return await agent.ensure_model("slow", None)

    assert run(node.agent(publish_timeout_s=0.1), body) == node.root / ".views" / "slow"
    assert [e["model"] for e in node.log.named("published")] == ["slow"]
    assert node.metric("warmpod_node_requests_total", result="miss") == 1
    assert node.metric("warmpod_node_requests_total", result="hit") == 1


# ---------------------------------------------------------------- references, in use


@pytest.mark.unit
def test_references_survive_a_restart(node: Node) -> None:
    target = Path("/var/lib/kubelet/pods/uid/volumes/kubernetes.io~csi/csi-1/mount")

    async def publish(agent: NodeAgent) -> None:
        await agent.ensure_model("a", "team-a")
        agent.reference("csi-1", "a", namespace="team-a", pod="embedder-0", target=target)

    run(node.agent(), publish)
    assert json.loads((node.root / ".volumes" / "csi-1.json").read_text())["pod"] == "embedder-0"
    restarted = node.agent()
    node.clock.pass_grace()

    async def after_restart(agent: NodeAgent) -> None:
        assert agent.references()["csi-1"] | {"published_at": None} == {
            "volume_id": "csi-1", "model": "a", "namespace": "team-a", "pod": "embedder-0", "target": str(target),
            "published_at": None,
        }  # fmt: skip
        assert agent.in_use() == {("a", "1")}
        assert node.metric("warmpod_node_volumes_published") == 1
        assert agent.unreference("csi-1") is not None
        assert agent.unreference("csi-1") is None  # idempotent
        assert agent.in_use() == set()
        assert node.metric("warmpod_node_volumes_published") == 0

    run(restarted, after_restart)
    assert list((node.root / ".volumes").iterdir()) == []


@pytest.mark.unit
def test_in_use_matches_maps_by_device_and_inode(node: Node, tmp_path: Path) -> None:
    """A pod maps the store's files through its own bind mount, under paths the agent never sees: /proc/PID/maps
    is matched by device:inode. A fake /proc holds one process mapping version 1 of `b` at a pod's path."""
    run(node.agent(), lambda agent: agent.ensure_model("b", None))
    weights = version_dir(node.root, "b", "1") / "model.safetensors"
    st = weights.stat()
    fake_proc = tmp_path / "proc"
    (fake_proc / "4242").mkdir(parents=True)
    (fake_proc / "self").mkdir()
    (fake_proc / "4242" / "maps").write_text(
        "55d0c0a00000-55d0c0a21000 r--p 00000000 fd:01 1234 /usr/bin/python3.11\n"
        "7f3a5c000000-7f3a5c021000 rw-p 00000000 00:00 0 \n"
        f"7f3a5d000000-7f3a5d013000 r--s 00000000 {os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x} {st.st_ino}"
        "    /models/b/versions/1/model.safetensors\n"
    )
    node.clock.pass_grace()

    async def in_use(agent: NodeAgent) -> set[tuple[str, str]]:
        return agent.in_use()

    assert run(node.agent(proc_root=fake_proc), in_use) == {("b", "1")}
    assert run(node.agent(proc_root=tmp_path / "empty"), in_use) == set()


@pytest.mark.unit
def test_mapped_inodes_parses_proc_maps() -> None:
    maps = (
        "00400000-00452000 r-xp 00000000 08:02 173521      /usr/bin/dbus-daemon\n"
        "7f3a5d000000-7f3a5d013000 r--s 00001000 00:10a 99  /dev/shm/warmpod/m/versions/1/model.safetensors\n"
        "7ffd6d5c2000-7ffd6d5e3000 rw-p 00000000 00:00 0                          [stack]\n"
        "7f3a5c000000-7f3a5c021000 rw-p 00000000 00:00 0 \n"
    )
    assert mapped_inodes(maps) == {(8, 2, 173521), (0, 0x10A, 99)}


# ---------------------------------------------------------------- eviction


def listing(name: str, *versions: tuple[str, int, bool]) -> ModelListing:
    return ModelListing(name, tuple(VersionListing(v, current, size, None, None) for v, size, current in versions))


@pytest.mark.unit
def test_eviction_order_takes_superseded_versions_then_whole_models_least_recently_used() -> None:
    models = [
        listing("a", ("1", 10, False), ("2", 10, True)),  # version 1 superseded, free
        listing("b", ("1", 20, True)),
        listing("c", ("3", 30, True)),  # referenced
        listing("d", ("1", 40, False), ("2", 40, True)),  # version 1 mapped: d's current may not go either
        listing("e", ("1", 50, True)),  # being staged
    ]
    in_use = {("c", "3"), ("d", "1")}
    order = eviction_order(models, in_use, protected={"e"}, last_used={"a": 5, "b": 1, "c": 0, "d": 2})
    assert order == [
        Eviction("a", ("1",), 10, whole_model=False),
        Eviction("b", ("1",), 20, whole_model=True),
        Eviction("a", ("2",), 10, whole_model=True),  # its superseded version went first
    ]
    assert plan_eviction(order, 25) == order[:2]
    assert plan_eviction(order, 0) == []
    assert plan_eviction(order, 41) is None


@pytest.mark.unit
def test_least_recently_used_is_evicted_under_the_budget(node: Node) -> None:
    async def body(agent: NodeAgent) -> None:
        await agent.ensure_model("a", None)
        await agent.ensure_model("b", None)
        await agent.ensure_model("a", None)  # a is used again: b is now the least recently used
        node.clock.pass_grace()
        await agent.ensure_model("c", None)

    run(node.agent(max_bytes=200 << 10), body)  # two models fit, not three
    assert {m.name for m in list_store(node.root)} == {"a", "c"}
    assert not (node.root / ".views" / "b").exists()
    assert node.metric("warmpod_node_evictions_total") == 1
    assert node.metric("warmpod_node_model_bytes", model="b") is None
    assert [(e["model"], e["versions"], e["whole_model"]) for e in node.log.named("evicted")] == [("b", ["1"], True)]
    assert node.metric("warmpod_node_budget_bytes") == 200 << 10


@pytest.mark.unit
def test_a_model_larger_than_the_budget_is_over_budget(node: Node) -> None:
    with pytest.raises(OverBudget) as info:
        run(node.agent(max_bytes=50 << 10), lambda agent: agent.ensure_model("a", None))
    need = format_bytes(source_bytes(node.sources / "a"))
    assert str(info.value).startswith(f"model 'a' needs {need}, more than the node budget --max-bytes 50.0 KiB")
    assert info.value.grpc_status == "RESOURCE_EXHAUSTED"
    assert list_store(node.root) == []


@pytest.mark.process
def test_eviction_never_takes_a_mapped_or_referenced_version(node: Node, mapper: Callable[[Path], Mapper]) -> None:
    """a is mapped by a process, b is referenced by a pod's volume: c does not fit, and nothing is evicted. Once the
    process unmaps a, a goes (the least recently used), b stays."""

    async def body(agent: NodeAgent) -> None:
        await agent.ensure_model("a", None)
        await agent.ensure_model("b", None)
        agent.reference("csi-b", "b", namespace=None, pod="pod-b", target=Path("/t"))
        reader = mapper(version_dir(node.root, "a", "1") / "model.safetensors")
        node.clock.pass_grace()
        with pytest.raises(OverBudget) as info:
            await agent.ensure_model("c", None)
        assert "evicting everything not in use frees only 0 B (in use or staging: a, b)" in str(info.value)
        assert {m.name for m in list_store(node.root)} == {"a", "b"}
        reader.stop()
        await agent.ensure_model("c", None)
        assert {m.name for m in list_store(node.root)} == {"b", "c"}

    run(node.agent(max_bytes=200 << 10), body)
    assert node.metric("warmpod_node_evictions_total") == 1
    assert node.metric("warmpod_node_staging_failures_total", kind="over_budget") == 1


@pytest.mark.process
def test_a_new_version_keeps_the_old_one_while_it_is_mapped(node: Node, mapper: Callable[[Path], Mapper]) -> None:
    """The loader's gc is off (keep=KEEP_ALL); the agent collects a superseded version only once nobody maps it."""

    async def body(agent: NodeAgent) -> None:
        await agent.ensure_model("a", None)
        reader = mapper(version_dir(node.root, "a", "1") / "model.safetensors")
        write_mlp(node.sources / "a", SIZES, seed=42)  # the source changes
        await agent.refresh()
        assert current_version(node.root, "a") == "2"
        assert version_dir(node.root, "a", "1").is_dir()  # still mapped
        reader.stop()
        await agent.refresh()  # unchanged source: nothing staged, the unmapped version collected
        assert [v.version for v in list_store(node.root)[0].versions] == ["2"]

    node.clock.pass_grace()
    run(node.agent(), body)
    assert [e["version"] for e in node.log.named("published")] == ["1", "2"]


@pytest.mark.unit
def test_the_watcher_publishes_a_new_version_when_the_source_changes(node: Node) -> None:
    async def body(agent: NodeAgent) -> None:
        await agent.ensure_model("a", None)
        write_mlp(node.sources / "a", SIZES, seed=42)
        async with asyncio.timeout(10):
            while current_version(node.root, "a") != "2":
                await asyncio.sleep(0.02)
        await agent.refresh()  # the superseded version, mapped by nobody, is collected
        assert [v.version for v in list_store(node.root)[0].versions] == ["2"]

    node.clock.pass_grace()
    run(node.agent(watch_s=0.05), body)
    assert [e["version"] for e in node.log.named("published")] == ["1", "2"]
    assert open_model(node.root / ".views" / "a", "a").version == "2"  # the view follows `current`
