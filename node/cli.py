"""`warmpod node`: the node agent, as the DaemonSet runs it. One process: the agent (staging, references, eviction),
its HTTP port (/healthz, /ready, /metrics, and the peer routes), and the CSI server on a unix socket.

Logs are JSON lines on stderr. Exit codes: 0 stopped by SIGTERM/SIGINT, 2 bad flags or catalog, 1 anything else.
SIGTERM stops serving and unmounts nothing: the views and the tmpfs stay, so pods keep their models across a
restart of the agent.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from prometheus_client import CollectorRegistry

from warmpod.cliargs import port_number, positive, size_arg
from warmpod.errors import UsageError, WarmpodError
from warmpod.node.agent import NodeAgent, NodeConfig, create_app, json_log
from warmpod.node.catalog import read_catalog
from warmpod.node.errors import NodeError

DEFAULT_ROOT = Path("/dev/shm/warmpod-node")
DEFAULT_PORT = 8479


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="warmpod node",
        description="The node agent: one model store per node, handed to pods as read-only CSI volumes.",
        allow_abbrev=False,
    )
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, metavar="DIR",
                   help=f"the node store (default {DEFAULT_ROOT})")  # fmt: skip
    p.add_argument("--catalog", type=Path, required=True, metavar="FILE",
                   help="the admin's catalog (JSON): model → source, namespaces, pinned sha256")  # fmt: skip
    p.add_argument("--max-bytes", type=size_arg, metavar="SIZE",
                   help="the store's budget, e.g. 64GiB: least recently used models not in use are evicted to stay "
                   "under it (default: no budget but the filesystem)")  # fmt: skip
    p.add_argument("--preload", nargs="+", default=[], metavar="NAME",
                   help="catalog models staged at start; /ready answers 200 once they are")  # fmt: skip
    p.add_argument("--watch", type=positive(float, 0.001), metavar="SECONDS",
                   help="poll the sources of staged models every SECONDS and publish new versions")  # fmt: skip
    p.add_argument("--host", default="0.0.0.0", help="address of the HTTP port (default 0.0.0.0: peers reach it)")
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                   help=f"HTTP port: /healthz, /ready, /metrics, peers (default {DEFAULT_PORT})")  # fmt: skip
    p.add_argument("--csi-socket", type=Path, metavar="PATH", help="serve the CSI node plugin on this unix socket")
    p.add_argument("--kubelet-dir", type=Path, default=Path("/var/lib/kubelet"), metavar="DIR",
                   help="the kubelet's root directory: volumes are mounted only below DIR/pods (default "
                   "/var/lib/kubelet)")  # fmt: skip
    p.add_argument("--node-id", metavar="ID", default=os.environ.get("NODE_NAME") or socket.gethostname(),
                   help="the CSI node id (default $NODE_NAME, else the hostname)")  # fmt: skip
    p.add_argument("--publish-timeout", type=positive(float, 0.001), default=120.0, metavar="SECONDS",
                   help="how long a volume's publish waits for its model to be staged (default 120)")  # fmt: skip
    p.add_argument("--tmpfs", action="store_true", help="mount a tmpfs of --max-bytes at --root (needs CAP_SYS_ADMIN)")
    p.add_argument("--huge", action="store_true", help="huge=within_size on that tmpfs (transparent huge pages)")
    p.add_argument("--peers", nargs="+", default=[], metavar="URL", help="peer agents' HTTP ports to fetch from")
    p.add_argument("--peer-token-file", type=Path, metavar="PATH",
                   help="the peers' shared token (a Secret's file): sent to peers and required from them")  # fmt: skip
    return p


def parse_config(args: argparse.Namespace) -> NodeConfig:
    """The flags as a NodeConfig, or a UsageError naming the flag."""
    for url in args.peers:
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"--peers {url}: expected an http:// or https:// URL of a peer agent's port")
    if args.peer_token_file is not None:
        try:
            token = args.peer_token_file.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise UsageError(f"--peer-token-file {args.peer_token_file}: cannot read: {e.strerror}") from None
        if not token:
            raise UsageError(f"--peer-token-file {args.peer_token_file}: the file is empty")
    if not args.node_id:
        raise UsageError("--node-id is empty: give the node's name (the DaemonSet passes spec.nodeName)")
    if args.root.exists() and not args.root.is_dir():
        raise UsageError(f"--root {args.root}: not a directory")
    return NodeConfig(
        root=args.root,
        catalog=read_catalog(args.catalog),
        max_bytes=args.max_bytes,
        preload=tuple(args.preload),
        watch_s=args.watch,
        publish_timeout_s=args.publish_timeout,
        tmpfs=args.tmpfs,
        huge=args.huge,
        host=args.host,
        port=args.port,
        csi_socket=args.csi_socket,
        kubelet_dir=args.kubelet_dir,
        node_id=args.node_id,
        peers=tuple(args.peers),
        peer_token_file=args.peer_token_file,
    )


def _optional_module(name: str, needed_for: str) -> ModuleType:
    """A part of the node agent built separately (the CSI server, the peer port), or an error saying it is missing."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise UsageError(f"{needed_for} needs {name}, which this installation lacks") from None


async def serve(config: NodeConfig, registry: CollectorRegistry) -> int:
    from aiohttp import web

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    agent = NodeAgent(config, registry, log=json_log)
    csi = _optional_module("warmpod.node.csi", "--csi-socket") if config.csi_socket is not None else None
    peers = _peer_module(config)
    await agent.start()
    runner: web.AppRunner | None = None
    csi_server: Any = None
    try:
        app = create_app(agent)
        if peers is not None:
            peers.add_peer_routes(app, agent)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, config.host, config.port).start()
        except OSError as e:
            raise NodeError(f"--port {config.port}: cannot listen on {config.host}: {e.strerror}") from None
        json_log("http_listening", host=config.host, port=runner.addresses[0][1])
        if csi is not None:
            csi_server = await csi.serve_csi(agent, config.csi_socket, node_id=config.node_id,
                                             kubelet_dir=config.kubelet_dir)  # fmt: skip
            json_log("csi_listening", socket=str(config.csi_socket), node_id=config.node_id)
        await stop.wait()
        json_log("stopping", reason="signal")
    finally:
        if csi_server is not None:
            await csi_server.stop(5)
        if runner is not None:
            await runner.cleanup()
        await agent.close()
    json_log("stopped", unmounted="nothing (views and the tmpfs stay: pods keep their models)")
    return 0


def _peer_module(config: NodeConfig) -> ModuleType | None:
    """The peer port (warmpod.node.peers), served when the agent has the peers' token."""
    if config.peer_token_file is None:
        return None
    return _optional_module("warmpod.node.peers", "--peer-token-file")


class _JsonLines(logging.Handler):
    """Library logs (the CSI server's) as the agent's JSON lines."""

    def emit(self, record: logging.LogRecord) -> None:
        line = {"ts": round(record.created, 3), "event": "log", "logger": record.name, "level": record.levelname,
                "message": record.getMessage()}  # fmt: skip
        print(json.dumps(line), file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = parse_config(args)
    except UsageError as e:
        print(f"warmpod node: error: {e}", file=sys.stderr)
        return e.exit_code
    logging.getLogger("warmpod").addHandler(_JsonLines())
    logging.getLogger("warmpod").setLevel(logging.INFO)
    try:
        return asyncio.run(serve(config, CollectorRegistry()))
    except WarmpodError as e:  # the one place an agent's error becomes its exit code
        print(f"warmpod node: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 0
