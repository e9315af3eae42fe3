"""A small real VolumeBackend for the CSI tests, and the CSI server run on it as a child process (the kubelet's side
talks to it over the unix socket with the generated stubs):

    python -m tests.node.csi_backend CONFIG_JSON

CONFIG_JSON: {"socket", "kubelet_dir", "node_id", "catalog" (the catalog's JSON document), "views" ({model: view
directory}), "failures" ({model: [NodeError kind, message]}: ensure_model raises it after the catalog check),
"unrecordable" ([model]: reference raises), "records" (a JSON file holding every reference, {volume_id: record})};
or, with "agent_root", the real NodeAgent on that node store and the catalog (views, failures and records unused).
It prints `CSI serving on SOCKET` once serving and stops on SIGTERM; a UsageError ends it with exit 2 and the message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from warmpod.errors import UsageError
from warmpod.node import errors
from warmpod.node.catalog import Catalog, parse_catalog
from warmpod.node.csi import VolumeBackend, serve_csi

READY_LINE = "CSI serving on "


class DirBackend:
    """Views are plain directories; the catalog is a real Catalog (its own NotInCatalog/NamespaceDenied messages);
    references are kept in a JSON file the test reads."""

    def __init__(
        self,
        catalog: Catalog,
        views: dict[str, Path],
        *,
        failures: dict[str, errors.NodeError] | None = None,
        unrecordable: set[str] | None = None,
        records: Path,
    ) -> None:
        self.catalog, self.views, self.records = catalog, views, records
        self.failures, self.unrecordable = failures or {}, unrecordable or set()
        self._write({})

    async def ensure_model(self, name: str, namespace: str | None) -> Path:
        self.catalog.entry(name, namespace)
        if name in self.failures:
            raise self.failures[name]
        return self.views[name]

    def reference(self, volume_id: str, model: str, *, namespace: str | None, pod: str | None, target: Path) -> None:
        if model in self.unrecordable:
            raise errors.NodeError(f"cannot record the reference of volume {volume_id} (test)")
        refs = self.read(self.records)
        refs[volume_id] = {"volume_id": volume_id, "model": model, "namespace": namespace, "pod": pod,
                           "target": str(target), "published_at": time.time()}  # fmt: skip
        self._write(refs)

    def unreference(self, volume_id: str) -> dict[str, Any] | None:
        refs = self.read(self.records)
        record = refs.pop(volume_id, None)
        self._write(refs)
        return record

    @staticmethod
    def read(records: Path) -> dict[str, dict[str, Any]]:
        refs: dict[str, dict[str, Any]] = json.loads(records.read_text())
        return refs

    def _write(self, refs: dict[str, dict[str, Any]]) -> None:
        partial = self.records.with_suffix(".partial")
        partial.write_text(json.dumps(refs))
        partial.replace(self.records)  # a reader never sees half a file


def backend_from(config: dict[str, Any]) -> DirBackend:
    failures = {model: getattr(errors, kind)(message) for model, (kind, message) in config.get("failures", {}).items()}
    return DirBackend(
        parse_catalog(json.dumps(config["catalog"])),
        {model: Path(view) for model, view in config["views"].items()},
        failures=failures,
        unrecordable=set(config.get("unrecordable", [])),
        records=Path(config["records"]),
    )


async def serve(config: dict[str, Any]) -> None:
    if "agent_root" not in config:
        await _serve(backend_from(config), config)
        return
    from prometheus_client import CollectorRegistry

    from warmpod.node.agent import NodeAgent, NodeConfig

    node_config = NodeConfig(root=Path(config["agent_root"]), catalog=parse_catalog(json.dumps(config["catalog"])),
                             kubelet_dir=Path(config["kubelet_dir"]), node_id=config["node_id"])  # fmt: skip
    async with NodeAgent(node_config, CollectorRegistry()) as agent:
        await _serve(agent, config)


async def _serve(backend: VolumeBackend, config: dict[str, Any]) -> None:
    socket_path = Path(config["socket"])
    server = await serve_csi(backend, socket_path, node_id=config["node_id"], kubelet_dir=Path(config["kubelet_dir"]),
                             version="0.0.0-test")  # fmt: skip
    print(f"{READY_LINE}{socket_path}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(json.loads(argv[0])))
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
