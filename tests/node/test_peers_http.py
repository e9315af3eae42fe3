"""The peer port as other agents meet it (read-only, Range, the shared token, nothing outside a version), and peer
discovery through the EndpointSlice API. Real aiohttp servers on 127.0.0.1: the peer routes over a staged store,
and a stand-in for the Kubernetes API answering the one request ServicePeers makes."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.kit.models import sha256_file, write_model_dir
from tests.kit.threaded_http import ThreadedAiohttpServer
from warmpod.errors import UsageError
from warmpod.loader.load import LoadRequest, load
from warmpod.node.peers import (
    PeerLookupFailed,
    ServicePeers,
    StaticPeers,
    add_peer_routes,
    bearer_matches,
    endpoint_urls,
    find_peer_version,
    is_inside,
    load_with_peers,
    read_token,
)
from warmpod.store import read_manifest

TOKEN = "peer-t0ken-never-logged-0xD00D"
SHARD = "model-00001-of-00002.safetensors"


class Served(ThreadedAiohttpServer):
    """An aiohttp app built by `make` (peer routes, or the Kubernetes API stand-in), access log on."""

    def __init__(self, make: Any) -> None:
        super().__init__("peer-http")
        self.make = make

    def _make_app(self) -> web.Application:
        app: web.Application = self.make()
        return app

    async def _astart(self) -> None:
        access_log = logging.getLogger("aiohttp.access")
        self._runner = web.AppRunner(self._make_app(), access_log=access_log, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]


class Peer:
    """A store with model `m` (version 1, every sha256 recorded) and its peer routes on a real port."""

    def __init__(self, tmp_path: Path) -> None:
        self.src = write_model_dir(tmp_path / "src", seed=2, scale=4, shards=2)
        self.store = tmp_path / "store"
        request = LoadRequest(uri=str(self.src), model="m", root=self.store, record_sha256=True)
        asyncio.run(load(request))
        self.reads: list[tuple[str, str]] = []
        self.server = Served(self._app).start()

    def _app(self) -> web.Application:
        app = web.Application()
        add_peer_routes(app, self.store, TOKEN, on_read=lambda model, version: self.reads.append((model, version)))
        return app

    def get(self, path: str, token: str | None = TOKEN, method: str = "GET", **headers: str) -> Answer:
        """One raw request (the path sent as it is: no client normalises '..' away)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=10)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        try:
            conn.request(method, path, headers=headers)
            response = conn.getresponse()
            return Answer(response.status, dict(response.getheaders()), response.read())
        finally:
            conn.close()


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Peer]:
    p = Peer(tmp_path)
    try:
        yield p
    finally:
        p.server.stop()


V1 = "/peer/v1/models/m/versions/1"


@pytest.mark.emulator
def test_only_requests_with_the_shared_token_are_served(peer: Peer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for token in (None, "wrong", TOKEN + "x", ""):
        r = peer.get("/peer/v1/models/m", token)
        assert (r.status, r.headers.get("WWW-Authenticate")) == (401, 'Bearer realm="warmpod-peer"'), token
        assert b"Authorization: Bearer TOKEN" in r.body
    r = peer.get(f"{V1}/{SHARD}", None)
    assert r.status == 401 and r.body != (peer.store / "m" / "versions" / "1" / SHARD).read_bytes()
    r = peer.get("/peer/v1/models/m", token=None, Authorization=f"Basic {TOKEN}")
    assert r.status == 401
    assert peer.reads == []

    ok = peer.get("/peer/v1/models/m")
    assert ok.status == 200
    listing = json.loads(ok.body)
    manifest = read_manifest(peer.store, "m", "1")
    assert listing["model"] == "m" and listing["current"] == "1"
    source = manifest["source"]
    assert listing["versions"] == [
        {"version": "1", "digest": source["digest"], "uri": source["uri"], "created_at": manifest["created_at"]}
    ]
    assert "aiohttp.access" in {r.name for r in caplog.records}  # the requests were logged, the token never
    assert TOKEN not in caplog.text


@pytest.mark.emulator
def test_files_are_served_with_range_and_the_manifest_too(peer: Peer) -> None:
    staged = peer.store / "m" / "versions" / "1"
    whole = peer.get(f"{V1}/{SHARD}")
    assert whole.status == 200 and whole.body == (staged / SHARD).read_bytes()
    part = peer.get(f"{V1}/{SHARD}", Range="bytes=100-199")
    assert part.status == 206 and part.body == (staged / SHARD).read_bytes()[100:200]
    head = peer.get(f"{V1}/tokenizer/vocab.txt", method="HEAD")
    size = (staged / "tokenizer" / "vocab.txt").stat().st_size
    assert (head.status, head.headers["Content-Length"], head.body) == (200, str(size), b"")
    assert json.loads(peer.get(f"{V1}/manifest.json").body) == read_manifest(peer.store, "m", "1")
    page = peer.get(f"{V1}/").body.decode()
    assert all(f'href="{f["path"]}"' in page for f in read_manifest(peer.store, "m", "1")["files"])
    assert set(peer.reads) == {("m", "1")} and len(peer.reads) == 4  # file requests, not listings


@pytest.mark.emulator
def test_nothing_outside_a_published_version_is_served(peer: Peer) -> None:
    (peer.store / "secret.txt").write_text("not a model file")
    for path in (f"{V1}/../../../secret.txt", f"{V1}/%2e%2e/%2e%2e/%2e%2e/secret.txt", f"{V1}/tokenizer/../config.json",
                 f"{V1}/./config.json", f"{V1}//config.json"):  # fmt: skip
        r = peer.get(path)
        assert (r.status, r.body) == (400, b"the path leaves the version: '..', '.' and empty segments are refused\n")
    assert peer.get(f"{V1}/.warmpod-staging.json").status == 404  # not in the manifest
    assert peer.get("/peer/v1/models/m/versions/2/config.json").status == 404
    assert peer.get("/peer/v1/models/m/versions/x/config.json").status == 404
    assert peer.get("/peer/v1/models/nope").status == 404
    assert peer.get("/peer/v1/models/.views").status == 404
    assert peer.get(f"{V1}/config.json", method="POST").status == 405
    assert peer.reads == []


@pytest.mark.emulator
def test_find_peer_version_names_why_each_peer_gave_nothing(peer: Peer) -> None:
    digest = read_manifest(peer.store, "m", "1")["source"]["digest"]
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    search = asyncio.run(find_peer_version([dead, peer.server.url], "m", "0" * 64, TOKEN))
    assert search.found is None
    assert search.misses[peer.server.url] == "no version of 'm' from this source identity (it has 1 others)"
    assert "Connect" in search.misses[dead]
    found = asyncio.run(find_peer_version([peer.server.url], "m", digest, TOKEN)).found
    assert found is not None and found.version == "1"
    assert dict(found.sha256) == {f["path"]: f["sha256"] for f in read_manifest(peer.store, "m", "1")["files"]}
    assert TOKEN not in repr(found.mirror(TOKEN))


@pytest.mark.emulator
def test_a_version_staged_without_sha256_is_not_mirrored(peer: Peer, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    asyncio.run(load(LoadRequest(uri=str(peer.src), model="m", root=plain)))  # the sidecar's way: no digests
    server = Served(lambda: _routes(plain)).start()
    try:
        digest = read_manifest(plain, "m", "1")["source"]["digest"]
        search = asyncio.run(find_peer_version([server.url], "m", digest, TOKEN))
    finally:
        server.stop()
    assert search.found is None
    assert search.misses[server.url].endswith("records no sha256 (staged without record_sha256): it cannot be checked")


def _routes(root: Path) -> web.Application:
    app = web.Application()
    add_peer_routes(app, root, TOKEN)
    return app


@pytest.mark.unit
def test_the_token_rules() -> None:
    assert bearer_matches(f"Bearer {TOKEN}", TOKEN) and bearer_matches(f"bearer  {TOKEN} ", TOKEN)
    assert not bearer_matches(TOKEN, TOKEN) and not bearer_matches(f"Basic {TOKEN}", TOKEN)
    assert not bearer_matches("Bearer ", TOKEN) and not bearer_matches(f"Bearer {TOKEN}", TOKEN + "!")
    with pytest.raises(UsageError, match="no peer token"):
        add_peer_routes(web.Application(), Path("/tmp"), "")


@pytest.mark.unit
def test_read_token_refuses_an_empty_or_missing_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(f"\n{TOKEN}\n")
    assert read_token(tmp_path / "token") == TOKEN
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(UsageError, match="empty"):
        read_token(tmp_path / "empty")
    with pytest.raises(UsageError, match="cannot read"):
        read_token(tmp_path / "missing")


@pytest.mark.unit
def test_is_inside() -> None:
    assert is_inside("model.safetensors") and is_inside("1_Pooling/config.json")
    for bad in ("", "/etc/passwd", "../x", "a/../../x", "a/./b", "a//b", "a\\b", "a\0b", "a/"):
        assert not is_inside(bad), bad


# ---------------------------------------------------------------- discovery

SLICES: dict[str, Any] = {
    "kind": "EndpointSliceList",
    "items": [
        {
            "ports": [{"name": "http", "port": 8473, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": True}},  # this node
                {"addresses": ["10.0.0.2"], "conditions": {"ready": True}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": False}},
                {"addresses": ["10.0.0.4"], "conditions": {"ready": True, "terminating": True}},
                {"addresses": ["10.0.0.5"]},  # no conditions: ready, says the API
            ],
        },
        {"ports": [{"name": "http", "port": 8473}], "endpoints": [{"addresses": ["fd00::6"], "conditions": {}}]},
        {"ports": [{"name": "metrics", "port": 9000}], "endpoints": [{"addresses": ["10.0.0.7"]}]},
    ],
}


@pytest.mark.unit
def test_endpoint_urls_are_the_ready_endpoints_of_the_named_port_but_ours() -> None:
    assert endpoint_urls(SLICES, "http", exclude=frozenset({"10.0.0.1"})) == [
        "http://10.0.0.2:8473",
        "http://10.0.0.5:8473",
        "http://[fd00::6]:8473",
    ]
    assert endpoint_urls(SLICES, 9000) == [f"http://{a}:9000" for a in
                                           ("10.0.0.1", "10.0.0.2", "10.0.0.5", "10.0.0.7", "[fd00::6]")]  # fmt: skip
    assert endpoint_urls({"items": None}, "http") == []


class KubeApi:
    """The one Kubernetes API call ServicePeers makes, answered from SLICES, with what it was asked recorded."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.asked: list[tuple[str, str, str]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", self.list_slices)
        return app

    async def list_slices(self, request: web.Request) -> web.Response:
        self.asked.append((request.match_info["ns"], request.query.get("labelSelector", ""),
                           request.headers.get("Authorization", "")))  # fmt: skip
        if self.status != 200:
            return web.json_response({"kind": "Status", "code": self.status}, status=self.status)
        return web.json_response(SLICES)


@pytest.fixture
def account(tmp_path: Path) -> Path:
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text("sa-token\n")
    (sa / "namespace").write_text("warmpod-system")
    return sa


@pytest.mark.emulator
def test_service_peers_lists_the_services_ready_endpoints_with_the_service_account(account: Path) -> None:
    api = KubeApi()
    server = Served(api.app).start()
    try:
        peers = ServicePeers("warmpod-node", "http", exclude=frozenset({"10.0.0.1"}), api=server.url, account=account)
        urls = asyncio.run(peers.peer_urls())
    finally:
        server.stop()
    assert urls == ["http://10.0.0.2:8473", "http://10.0.0.5:8473", "http://[fd00::6]:8473"]
    assert api.asked == [("warmpod-system", "kubernetes.io/service-name=warmpod-node", "Bearer sa-token")]


@pytest.mark.emulator
def test_a_discovery_that_fails_is_a_miss_and_the_origin_is_loaded(account: Path, tmp_path: Path) -> None:
    api = KubeApi(status=403)
    server = Served(api.app).start()
    src = write_model_dir(tmp_path / "src", seed=1)
    try:
        peers = ServicePeers("warmpod-node", "http", api=server.url, account=account)
        with pytest.raises(PeerLookupFailed, match="answered 403"):
            asyncio.run(peers.peer_urls())
        request = LoadRequest(uri=str(src), model="m", root=tmp_path / "store")
        result = asyncio.run(load_with_peers(request, peers, TOKEN))
    finally:
        server.stop()
    assert result.peer is None and result.result.version == "1"
    assert result.misses["peer discovery"].startswith("the Kubernetes API answered 403")
    files = read_manifest(tmp_path / "store", "m", "1")["files"]
    assert all(f["sha256"] == sha256_file(src / f["path"]) for f in files)  # recorded, to serve peers in turn


@pytest.mark.unit
def test_outside_a_cluster_service_peers_says_so(account: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(PeerLookupFailed, match="KUBERNETES_SERVICE_HOST is unset"):
        asyncio.run(ServicePeers("warmpod-node", "http", account=account).peer_urls())
    assert asyncio.run(StaticPeers(("http://a:1/", "http://b:2")).peer_urls()) == ["http://a:1", "http://b:2"]
