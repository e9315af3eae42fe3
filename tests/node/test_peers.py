"""Peer fetch (warmpod.node.peers): a node stages a model from another node's published copy, checked against the
origin, and falls back to the origin on any failure of the peer.

The origin is SeaweedFS behind a request-counting FaultProxy; a peer is the peer routes of a real aiohttp server on
127.0.0.1 over a store staged from that origin (node A); node B is a second store loading through the peer."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import stat
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.kit.fault_proxy import FaultProxy
from tests.kit.models import tree_digests, write_model_dir
from tests.kit.s3 import S3Bucket, SeaweedServer
from tests.kit.threaded_http import ThreadedAiohttpServer
from warmpod.loader.load import LoadRequest, load
from warmpod.loader.stream import StreamSettings
from warmpod.node.peers import (
    PeerLoad,
    add_peer_routes,
    find_peer_version,
    load_with_peers,
    version_url,
)
from warmpod.store import read_manifest

pytestmark = [pytest.mark.emulator, pytest.mark.seaweed]

TOKEN = "peer-t0ken-never-logged-0xFEED"
MODEL = "m"
SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


class PeerServer(ThreadedAiohttpServer):
    """The peer routes over a store root, served by aiohttp in a thread (access log on, to show what it logs);
    every request recorded, and every read hook call."""

    def __init__(self, root: Path, token: str = TOKEN) -> None:
        super().__init__("peer")
        self.root, self.token = root, token
        self.touched: list[tuple[str, str]] = []

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._recorder])
        add_peer_routes(
            app, self.root, self.token, on_read=lambda model, version: self.touched.append((model, version))
        )
        return app

    @web.middleware
    async def _recorder(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        record = self._record(request)
        response = await handler(request)
        record.status = response.status
        return response

    async def _astart(self) -> None:
        access_log = logging.getLogger("aiohttp.access")
        self._runner = web.AppRunner(self._make_app(), access_log=access_log, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]


class Cluster:
    """The origin (SeaweedFS behind a FaultProxy), node A's store staged from it, A's peer port, and node B's store."""

    def __init__(self, tmp_path: Path, bucket: S3Bucket, proxy: FaultProxy) -> None:
        self.src = write_model_dir(tmp_path / "src", seed=5, scale=8, shards=3)
        bucket.upload_dir(self.src, prefix="models/m/")
        self.uri = bucket.uri("models/m/")
        self.proxy = proxy
        self.expected = tree_digests(self.src)
        self.store_a, self.store_b = tmp_path / "node-a", tmp_path / "node-b"
        self.a = self.load(self.store_a, [])
        assert self.a.peer is None and self.a.origin_bytes > 0
        self.peer = PeerServer(self.store_a).start()
        self.proxy.reset_stats()

    def request(self, store: Path, **changes: Any) -> LoadRequest:
        return LoadRequest(uri=self.uri, model=MODEL, root=store, **changes)

    def load(self, store: Path, peers: list[str], token: str | None = TOKEN, **changes: Any) -> PeerLoad:
        return asyncio.run(load_with_peers(self.request(store, **changes), peers, token))

    def origin_weight_gets(self) -> list[str]:
        """The object GETs of weight files the origin answered (listings, HEADs and the index are not counted)."""
        return [
            r.path.rsplit("/", 1)[1]
            for r in self.proxy.requests.records()
            if r.method == "GET" and r.path.endswith(".safetensors")
        ]

    def staged(self, store: Path) -> dict[str, str]:
        digests = tree_digests(store / MODEL / "current")
        del digests["manifest.json"]
        return digests

    def assert_published_as_origin(self, store: Path, version: str = "1") -> None:
        """B's one version: the origin's bytes, URI and identity, every file's sha256; nothing left in staging."""
        assert self.staged(store) == self.expected
        mine, origin = read_manifest(store, MODEL, version), read_manifest(self.store_a, MODEL, "1")
        assert mine["source"] == origin["source"]
        assert {f["path"]: f["sha256"] for f in mine["files"]} == self.expected
        assert sorted(os.listdir(store / MODEL / "versions")) == [version]
        staging = store / MODEL / "staging"
        assert not staging.exists() or list(staging.iterdir()) == []

    def stop(self) -> None:
        self.peer.stop()


@pytest.fixture
def cluster(
    tmp_path: Path,
    seaweed_s3: SeaweedServer,
    seaweed_bucket: S3Bucket,
    fault_proxy: Callable[..., FaultProxy],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Cluster]:
    proxy = fault_proxy(seaweed_s3.endpoint)
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in seaweed_s3.env(proxy.endpoint).items():
        monkeypatch.setenv(name, value)
    c = Cluster(tmp_path, seaweed_bucket, proxy)
    try:
        yield c
    finally:
        c.stop()


def writable(path: Path) -> Path:
    path.chmod(path.stat().st_mode | stat.S_IWUSR)
    return path


def test_a_second_node_gets_the_model_from_a_peer_without_reading_the_origins_weights(cluster: Cluster) -> None:
    b = cluster.load(cluster.store_b, [cluster.peer.url])

    assert cluster.origin_weight_gets() == []  # the origin was listed and HEADed, never read
    assert cluster.proxy.stats().total > 0
    assert b.peer == version_url(cluster.peer.url, MODEL, "1") and b.peer_error is None and b.misses == {}
    total = sum((cluster.src / rel).stat().st_size for rel in cluster.expected)
    assert b.origin_bytes == 0 and b.peer_bytes >= total
    cluster.assert_published_as_origin(cluster.store_b)
    assert set(cluster.peer.touched) == {(MODEL, "1")}  # the agent's LRU hook heard the reads


def test_a_peer_connection_reset_mid_body_falls_back_to_the_origin_keeping_what_the_peer_completed(
    cluster: Cluster, fault_proxy: Callable[..., FaultProxy]
) -> None:
    # One request at a time, one range per file: the peer's ranged GETs are the 3 header probes, then one per file
    # in order; the 5th (the second shard's body) is cut after half its bytes by a TCP reset.
    before_peer = fault_proxy(cluster.peer.url, reset_every=5, reset_mode="rst")
    settings = StreamSettings(concurrency=1, chunk_size=2 << 20, max_buffer_bytes=2 << 20)

    b = cluster.load(cluster.store_b, [before_peer.url], settings=settings)

    assert before_peer.stats().resets == 1
    assert b.peer_error is not None and SHARDS[1] in b.peer_error
    assert cluster.origin_weight_gets() == SHARDS[1:]  # the first shard, verified from the peer, was kept
    assert b.origin_bytes > 0 and b.peer_bytes > 0
    cluster.assert_published_as_origin(cluster.store_b)


def test_a_peer_that_dies_after_it_was_found_leaves_the_load_to_the_origin(cluster: Cluster) -> None:
    digest = read_manifest(cluster.store_a, MODEL, "1")["source"]["digest"]
    found = asyncio.run(find_peer_version([cluster.peer.url], MODEL, digest, TOKEN)).found
    assert found is not None
    cluster.peer.stop()

    result = asyncio.run(load(cluster.request(cluster.store_b, mirror=found.mirror(TOKEN))))

    assert result.mirror_error is not None and "Connect" in result.mirror_error
    assert sorted(set(cluster.origin_weight_gets())) == SHARDS
    cluster.assert_published_as_origin(cluster.store_b)


def test_a_peer_file_tampered_under_its_manifest_is_refused_and_fetched_from_the_origin(cluster: Cluster) -> None:
    shard = writable(cluster.store_a / MODEL / "versions" / "1" / SHARDS[2])
    data = bytearray(shard.read_bytes())
    data[-64] ^= 0x01  # one bit of a weight: same size, same header
    shard.write_bytes(bytes(data))

    b = cluster.load(cluster.store_b, [cluster.peer.url])

    assert b.peer_error == (
        f"{SHARDS[2]}: its bytes do not match its manifest (sha256 {tree_digests(shard.parent)[SHARDS[2]]})"
    )
    assert SHARDS[2] in cluster.origin_weight_gets()
    cluster.assert_published_as_origin(cluster.store_b)


def test_a_peer_whose_manifest_and_bytes_agree_but_differ_from_the_origin_is_refused(
    cluster: Cluster, tmp_path: Path
) -> None:
    # Node C holds another model of the same shapes (so the same sizes) and claims the origin's identity.
    other = write_model_dir(tmp_path / "other", seed=6, scale=8, shards=3)
    store_c = tmp_path / "node-c"
    asyncio.run(load(LoadRequest(uri=str(other), model=MODEL, root=store_c, record_sha256=True)))
    manifest_path = writable(store_c / MODEL / "versions" / "1" / "manifest.json")
    manifest = json.loads(manifest_path.read_text())
    manifest["source"] = read_manifest(cluster.store_a, MODEL, "1")["source"]
    manifest_path.write_text(json.dumps(manifest))
    liar = PeerServer(store_c).start()
    try:
        b = cluster.load(cluster.store_b, [liar.url])
        # With the catalog's pins the lie is seen before a byte is fetched.
        pinned = cluster.load(tmp_path / "node-d", [liar.url], sha256={SHARDS[0]: cluster.expected[SHARDS[0]]})
    finally:
        liar.stop()

    assert b.peer is not None and b.peer_error is not None
    # the first shard the liar finished: its own manifest agrees, the S3 ETag (the origin's MD5) does not
    assert re.fullmatch(r"model-0000\d-of-00003.safetensors: its bytes are not the origin's "
                        r"\(MD5 [0-9a-f]{32}, ETag [0-9a-f]{32}\)", b.peer_error)  # fmt: skip
    cluster.assert_published_as_origin(cluster.store_b)
    assert pinned.peer_error is not None and pinned.peer_error.startswith(f"{SHARDS[0]}: its sha256 ")
    assert pinned.peer_bytes == 0
    cluster.assert_published_as_origin(tmp_path / "node-d")


def test_a_peer_that_refuses_our_token_is_a_miss_and_the_token_is_never_logged(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    b = cluster.load(cluster.store_b, [cluster.peer.url], token="not-" + TOKEN)

    assert b.peer is None and b.peer_bytes == 0
    assert b.misses == {cluster.peer.url: "401 listing the model's versions: the peer refused our token "
                                          "(every agent must share one peer token)"}  # fmt: skip
    assert cluster.peer.requests.count("GET") == 1 and cluster.peer.touched == []
    cluster.assert_published_as_origin(cluster.store_b)
    assert caplog.records and "aiohttp.access" in {r.name for r in caplog.records}
    assert TOKEN not in caplog.text and TOKEN not in repr(b)
