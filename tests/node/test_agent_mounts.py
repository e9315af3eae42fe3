"""The agent's mounts, for real: its tmpfs at the root (size = --max-bytes), each model's view a read-only bind made
once, unmounted when the model is evicted, and nothing unmounted when the agent closes; a second agent keeps the
tmpfs and the views. The agent runs in a child process in its own private mount namespace (`python -m
tests.node.test_agent_mounts WORKDIR` under `unshare -m`), which reports what it saw as JSON; nothing it mounts
reaches this namespace."""

from __future__ import annotations

import asyncio
import errno
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.kit.models import write_mlp
from tests.kit.warmpod import REPO, child_env
from warmpod.node.agent import HANDOFF_GRACE_S, NodeAgent, NodeConfig
from warmpod.node.catalog import parse_catalog
from warmpod.node.mounts import is_mount_point

BUDGET = 148 << 10  # one ~77 KiB model fits, two do not (a multiple of the page size: tmpfs rounds up)


def mounts_at(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> list[dict[str, str]]:
    """Every mount stacked at `path` (bottom first): its filesystem type, source, and mount and superblock options."""
    found = []
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        if fields[4] == str(path):
            tail = fields[fields.index("-") + 1 :]
            found.append({"fstype": tail[0], "source": tail[1], "options": fields[5], "super": tail[2]})
    return found


def in_namespace(work: Path) -> dict[str, Any]:
    """The scenario, run inside the private mount namespace: what it saw, as JSON-ready values."""
    root, sources = work / "root", work / "sources"
    catalog = parse_catalog(json.dumps({"models": {n: {"source": str(sources / n), "namespaces": ["*"]}
                                                   for n in ("a", "b")}}))  # fmt: skip
    config = NodeConfig(root=root, catalog=catalog, max_bytes=BUDGET, tmpfs=True)
    now = [0.0]
    seen: dict[str, Any] = {}

    async def first(agent: NodeAgent) -> None:
        view = await agent.ensure_model("a", None) / "a"
        seen["tmpfs"] = mounts_at(root)
        seen["view"] = mounts_at(view)
        try:
            (view / "intruder").write_text("x")
        except OSError as e:
            seen["write_errno"] = e.errno
        seen["view_files"] = sorted(p.name for p in (view / "current").iterdir())
        await agent.ensure_model("a", None)  # made once: a second call binds nothing more
        seen["view_after_hit"] = len(mounts_at(view))
        now[0] += HANDOFF_GRACE_S + 1
        await agent.ensure_model("b", None)  # does not fit beside a: a is evicted, its view unmounted
        seen["evicted_view"] = {"mounts": mounts_at(view), "exists": (root / ".views" / "a").exists()}

    async def second(agent: NodeAgent) -> None:
        seen["restart"] = {
            "tmpfs": len(mounts_at(root)),
            "view_b": len(mounts_at(root / ".views" / "b" / "b")),
            "staged": agent.staged("b"),
        }

    async def run(body: Any) -> None:
        async with NodeAgent(config, CollectorRegistry(), log=lambda *_, **__: None, clock=lambda: now[0]) as agent:
            await body(agent)

    asyncio.run(run(first))
    seen["after_close"] = {"tmpfs": len(mounts_at(root)), "view_b": len(mounts_at(root / ".views" / "b" / "b"))}
    asyncio.run(run(second))
    return seen


@pytest.mark.namespace
def test_views_are_read_only_binds_made_once_and_unmounted_on_eviction(tmp_path: Path, namespaced: None) -> None:
    for seed, name in enumerate(("a", "b")):
        write_mlp(tmp_path / "sources" / name, (64, 256, 10), seed=seed)
    command = ["unshare", "-m", "--propagation", "private", sys.executable, "-m", "tests.node.test_agent_mounts"]
    proc = subprocess.run([*command, str(tmp_path)], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)

    [tmpfs] = seen["tmpfs"]
    assert (tmpfs["fstype"], tmpfs["source"]) == ("tmpfs", "warmpod-node")
    assert f"size={BUDGET // 1024}k" in tmpfs["super"].split(",")
    [view] = seen["view"]
    assert "ro" in view["options"].split(",") and view["fstype"] == "tmpfs"
    assert seen["write_errno"] == errno.EROFS
    assert seen["view_files"] == ["config.json", "manifest.json", "model.safetensors"]
    assert seen["view_after_hit"] == 1
    assert seen["evicted_view"] == {"mounts": [], "exists": False}
    assert seen["after_close"] == {"tmpfs": 1, "view_b": 1}  # closing unmounts nothing
    assert seen["restart"] == {"tmpfs": 1, "view_b": 1, "staged": True}  # kept, not mounted again
    assert not is_mount_point(tmp_path / "root")  # all of it stayed in the child's namespace


if __name__ == "__main__":
    print(json.dumps(in_namespace(Path(sys.argv[1]))))
