"""The peer port: a node agent serves its published versions to the other agents, and stages a model from a peer's
copy (checked byte for byte against the origin) before it asks the origin.

PEER API (warmpod-peer/1), read-only, every request with `Authorization: Bearer TOKEN` (the token shared by every
agent, from a Secret; none or a wrong one: 401 with `WWW-Authenticate: Bearer`):

    GET /peer/v1/models/NAME                      {"model", "current", "versions": [{"version", "digest", "uri",
                                                  "created_at"}, ...newest first]}; 404 if NAME has no version
    GET /peer/v1/models/NAME/versions/N/          an HTML page linking the version's files (fsspec's HTTP listing)
    GET /peer/v1/models/NAME/versions/N/PATH      a file of the version (PATH as in its manifest, or manifest.json),
                                                  with Range, HEAD, ETag; a PATH the manifest does not list: 404,
                                                  one with '..' or other segments leaving the version: 400

"digest" is the source identity digest of the manifest (store FORMAT rule 5): equal digests mean copies of the
same bytes of the same origin. The client side (`load_with_peers`) asks each peer for a version with the origin's
digest and loads it as a mirror load (`warmpod.loader.load.Mirror`): the origin's listing decides the files, the
peer supplies the bytes, every file is verified, and any failure falls back to the origin.
"""

from __future__ import annotations

import dataclasses
import hmac
import html
import json
import os
import random
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
from aiohttp import web

from warmpod.errors import UsageError, WarmpodError
from warmpod.loader.load import LoadEvents, LoadRequest, LoadResult, Mirror, load
from warmpod.loader.publish import find_version
from warmpod.loader.sources import open_source, redact
from warmpod.node.errors import NodeError
from warmpod.store import MANIFEST, StoreError, check_model_name, current_version, read_manifest, version_numbers

PEER_PREFIX = "/peer/v1"
REALM = "warmpod-peer"


def read_token(path: Path) -> str:
    """The shared peer token from its Secret file (surrounding whitespace dropped). UsageError if unreadable or
    empty: an agent never serves or asks peers without one."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise UsageError(f"--peer-token-file {path}: cannot read: {e.strerror}") from None
    if not token:
        raise UsageError(f"--peer-token-file {path}: the file is empty; put the shared peer token in it")
    return token


# ---------------------------------------------------------------- server side


class _PeerConfig(Protocol):
    @property
    def peer_token_file(self) -> Path | None: ...


class PeerHost(Protocol):
    """What the peer routes need of a node agent (warmpod.node.agent.NodeAgent has it): its store root, its
    config's token file, and `touch(model)`, told of every read of a version (a version peers read is in use: it
    bumps the least-recently-used order). `touch` runs on the event loop once per file request (a range request
    each): keep it cheap."""

    @property
    def root(self) -> Path: ...

    @property
    def config(self) -> _PeerConfig: ...

    def touch(self, name: str) -> None: ...


@dataclass
class PeerRoutes:
    """The state behind the peer routes: the store root, the token, the read hook and a count of reads."""

    root: Path
    token: str = field(repr=False)
    on_read: Callable[[str, str], None] | None = None
    reads: Counter[tuple[str, str]] = field(default_factory=Counter)  # (model, version) → file requests served


PEER_ROUTES = web.AppKey("peer_routes", PeerRoutes)


def add_peer_routes(
    app: web.Application,
    root_or_agent: Path | PeerHost,
    token: str | None = None,
    *,
    on_read: Callable[[str, str], None] | None = None,
) -> PeerRoutes:
    """Serve the published versions under `root_or_agent` on `app` at /peer/v1/ to requests bearing the token.

    A store root needs `token`; an agent (PeerHost) gives its root, its token (read from
    `config.peer_token_file` unless `token` is given) and its read hook (`touch(model)`). `on_read(model,
    version)`, when given, is the read hook instead. Returns the routes' state (also at app[PEER_ROUTES])."""
    if isinstance(root_or_agent, Path):
        root, hook = root_or_agent, on_read
    else:
        host = root_or_agent
        root, hook = Path(host.root), on_read or (lambda model, _version: host.touch(model))
        if token is None and host.config.peer_token_file is not None:
            token = read_token(host.config.peer_token_file)
    if not token:
        raise UsageError("no peer token: peers are served only to requests with the shared token (--peer-token-file)")
    routes = PeerRoutes(root, token, hook)
    app[PEER_ROUTES] = routes
    app.router.add_get(PEER_PREFIX + "/models/{model}", _authorized(routes, _versions))
    app.router.add_get(PEER_PREFIX + "/models/{model}/versions/{version}/", _authorized(routes, _listing))
    app.router.add_get(PEER_PREFIX + "/models/{model}/versions/{version}/{path:.+}", _authorized(routes, _file))
    return routes


Handler = Callable[[PeerRoutes, web.Request], Awaitable[web.StreamResponse]]


def _authorized(routes: PeerRoutes, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def checked(request: web.Request) -> web.StreamResponse:
        if not bearer_matches(request.headers.get("Authorization", ""), routes.token):
            return web.Response(
                status=401,
                text="peer requests need the shared token: Authorization: Bearer TOKEN\n",
                headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'},
            )
        return await handler(routes, request)

    return checked


def bearer_matches(authorization: str, token: str) -> bool:
    """Whether an Authorization header carries `token` as its bearer token (compared in constant time)."""
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def _not_found(what: str) -> web.Response:
    return web.Response(status=404, text=f"{what}\n")


def _model(request: web.Request) -> str | None:
    name = request.match_info["model"]
    try:
        return check_model_name(name)
    except UsageError:
        return None


async def _versions(routes: PeerRoutes, request: web.Request) -> web.StreamResponse:
    name = _model(request)
    if name is None:
        return _not_found("no such model")
    versions = published_versions(routes.root, name)
    if not versions:
        return _not_found(f"model {name!r} has no published version here")
    return web.json_response({"model": name, "current": current_version(routes.root, name), "versions": versions})


def published_versions(root: Path, name: str) -> list[dict[str, Any]]:
    """A model's published versions, newest first, with their source identity digests (a version whose manifest
    cannot be read is left out: it is being removed, or broken)."""
    out = []
    for n in reversed(version_numbers(root, name)):
        try:
            manifest = read_manifest(root, name, str(n))
            source = manifest["source"]
            out.append(
                {
                    "version": str(n),
                    "digest": str(source["digest"]),
                    "uri": str(source.get("uri", "")),
                    "created_at": manifest.get("created_at"),
                }
            )
        except (OSError, StoreError, KeyError, TypeError):
            continue
    return out


def _version_manifest(routes: PeerRoutes, request: web.Request) -> tuple[str, str, dict[str, Any]] | web.Response:
    name, version = _model(request), request.match_info["version"]
    if name is None or not version.isdigit():
        return _not_found("no such model version")
    try:
        return name, version, read_manifest(routes.root, name, version)
    except (OSError, StoreError):
        return _not_found(f"model {name!r} has no version {version} here")


async def _listing(routes: PeerRoutes, request: web.Request) -> web.StreamResponse:
    found = _version_manifest(routes, request)
    if isinstance(found, web.Response):
        return found
    _, _, manifest = found
    paths = [MANIFEST, *(str(f["path"]) for f in manifest.get("files", []))]
    links = "\n".join(f'<a href="{html.escape(quote(p))}">{html.escape(p)}</a><br>' for p in paths)
    return web.Response(text=f"<!DOCTYPE html>\n<html><body>\n{links}\n</body></html>\n", content_type="text/html")


async def _file(routes: PeerRoutes, request: web.Request) -> web.StreamResponse:
    rel = request.match_info["path"]
    if not is_inside(rel):
        return web.Response(status=400, text="the path leaves the version: '..', '.' and empty segments are refused\n")
    found = _version_manifest(routes, request)
    if isinstance(found, web.Response):
        return found
    name, version, manifest = found
    if rel != MANIFEST and rel not in {str(f.get("path")) for f in manifest.get("files", [])}:
        return _not_found(f"version {version} of {name!r} has no file {rel!r}")
    path = routes.root / name / "versions" / version / rel
    if not path.is_file():  # removed since the manifest was read
        return _not_found(f"model {name!r} has no version {version} here")
    routes.reads[(name, version)] += 1
    if routes.on_read is not None:
        routes.on_read(name, version)
    return web.FileResponse(path, headers={"Cache-Control": "no-store"})


def is_inside(rel: str) -> bool:
    """Whether a relative path names something inside its directory: no '..', '.', empty, absolute or backslash
    segments, no NUL. (Served paths must also be listed in the manifest; this refuses the rest with 400.)"""
    if not rel or rel.startswith("/") or "\\" in rel or "\0" in rel:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


# ---------------------------------------------------------------- client side


class PeerLookupFailed(NodeError):
    """The peers could not be found (the Kubernetes API refused or is unreachable): staging goes to the origin."""


class PeerDirectory(Protocol):
    """Where the peers are: their base URLs (http://ADDRESS:PORT), this node's own left out."""

    async def peer_urls(self) -> list[str]: ...


@dataclass(frozen=True)
class StaticPeers:
    """The peers named on the command line (`--peers URL...`)."""

    urls: tuple[str, ...]

    async def peer_urls(self) -> list[str]:
        return [u.rstrip("/") for u in self.urls]


SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True)
class ServicePeers:
    """The ready endpoints of a (headless) Service, read from the EndpointSlice API with the pod's service account
    (RBAC: `list` on `endpointslices` of `discovery.k8s.io` in `namespace`). `port`: the Service port's name or
    number; `exclude`: this node's own addresses (its pod IP). The API is the in-cluster one
    (KUBERNETES_SERVICE_HOST/PORT, the service account's CA) unless `api` says otherwise."""

    service: str
    port: int | str
    namespace: str | None = None  # None: the service account's namespace
    exclude: frozenset[str] = frozenset()
    scheme: str = "http"
    api: str | None = None
    account: Path = SERVICE_ACCOUNT
    timeout_s: float = 5.0

    async def peer_urls(self) -> list[str]:
        api = self.api or _in_cluster_api()
        namespace = self.namespace or _read(self.account / "namespace", "namespace")
        token = _read(self.account / "token", "token")
        url = (
            f"{api.rstrip('/')}/apis/discovery.k8s.io/v1/namespaces/{quote(namespace, safe='')}/endpointslices"
            f"?labelSelector={quote('kubernetes.io/service-name=' + self.service, safe='')}"
        )
        ssl_context: ssl.SSLContext | bool = True
        if api.startswith("https://") and (self.account / "ca.crt").is_file():
            ssl_context = ssl.create_default_context(cafile=str(self.account / "ca.crt"))
        try:
            async with (
                aiohttp.ClientSession(
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                ) as session,
                session.get(url, ssl=ssl_context) as r,
            ):
                if r.status != 200:
                    raise PeerLookupFailed(
                        f"the Kubernetes API answered {r.status} listing the endpoints of Service {self.service!r} "
                        f"in {namespace!r} (does the service account may list discovery.k8s.io endpointslices?)"
                    )
                doc = await r.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise PeerLookupFailed(f"cannot list the endpoints of Service {self.service!r}: {e}") from None
        return endpoint_urls(doc, self.port, exclude=self.exclude, scheme=self.scheme)


def _in_cluster_api() -> str:
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise PeerLookupFailed("not in a Kubernetes pod (KUBERNETES_SERVICE_HOST is unset): name the peers instead")
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise PeerLookupFailed(f"cannot read the service account's {what} ({path}): {e.strerror}") from None


def endpoint_urls(
    doc: Mapping[str, Any], port: int | str, *, exclude: frozenset[str] = frozenset(), scheme: str = "http"
) -> list[str]:
    """Base URLs of the ready endpoints in an EndpointSliceList (pure). A named `port` is looked up in each slice's
    ports (a slice without it is skipped); a number is used as it is. Not ready or terminating endpoints, and the
    addresses in `exclude`, are left out."""
    urls: set[str] = set()
    for item in doc.get("items") or []:
        number: int | None = port if isinstance(port, int) else None
        if isinstance(port, str):
            number = next((p.get("port") for p in item.get("ports") or [] if p.get("name") == port), None)
        if number is None:
            continue
        for endpoint in item.get("endpoints") or []:
            conditions = endpoint.get("conditions") or {}
            if conditions.get("ready") is False or conditions.get("terminating") is True:
                continue  # the API documents a missing "ready" as ready
            for address in endpoint.get("addresses") or []:
                if address not in exclude:
                    host = f"[{address}]" if ":" in address else address
                    urls.add(f"{scheme}://{host}:{number}")
    return sorted(urls)


@dataclass(frozen=True)
class PeerVersion:
    """A published version on a peer, staged from the source identity that was asked for."""

    peer: str  # the peer's base URL
    model: str
    version: str
    digest: str
    sha256: Mapping[str, str]  # per file, from the peer's manifest
    sizes: Mapping[str, int]

    @property
    def url(self) -> str:
        return version_url(self.peer, self.model, self.version)

    def mirror(self, token: str) -> Mirror:
        """The loader's mirror for this version, authenticated with the shared token."""
        return Mirror(
            url=self.url,
            digest=self.digest,
            sha256=dict(self.sha256),
            sizes=dict(self.sizes),
            headers={"Authorization": f"Bearer {token}"},
        )


def version_url(peer: str, model: str, version: str) -> str:
    return f"{peer.rstrip('/')}{PEER_PREFIX}/models/{model}/versions/{version}"


@dataclass(frozen=True)
class PeerSearch:
    """What asking the peers found: the version to mirror (None: no peer has one), and why each peer asked did not
    give one (peer URL → reason), for the agent's log."""

    found: PeerVersion | None
    misses: dict[str, str]


async def find_peer_version(
    peers: Sequence[str],
    model: str,
    digest: str,
    token: str,
    *,
    timeout_s: float = 10.0,
    rng: random.Random | None = None,
) -> PeerSearch:
    """Ask `peers` (in random order, so many agents staging at once spread over them) for a published version of
    `model` staged from source identity `digest`, until one has it. A peer that fails, refuses or lacks it is a miss;
    only a version whose manifest says `digest` and names the sha256 of its files is taken."""
    order = list(peers)
    (rng or random.Random()).shuffle(order)
    misses: dict[str, str] = {}
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(3.0, timeout_s))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}, timeout=timeout) as session:
        for peer in order:
            try:
                found = await _ask_peer(session, peer.rstrip("/"), model, digest)
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as e:
                found = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if isinstance(found, PeerVersion):
                return PeerSearch(found, misses)
            misses[redact(peer)] = found
    return PeerSearch(None, misses)


async def _ask_peer(session: aiohttp.ClientSession, peer: str, model: str, digest: str) -> PeerVersion | str:
    """The peer's version of `model` with source identity `digest`, or why there is none."""
    async with session.get(f"{peer}{PEER_PREFIX}/models/{model}") as r:
        if r.status != 200:
            return _refusal(r.status, "listing the model's versions")
        listing = await r.json()
    matching = [v["version"] for v in listing["versions"] if v.get("digest") == digest]
    if not matching:
        return f"no version of {model!r} from this source identity (it has {len(listing['versions'])} others)"
    version = str(max(matching, key=int))
    async with session.get(f"{version_url(peer, model, version)}/{MANIFEST}") as r:
        if r.status != 200:
            return _refusal(r.status, f"reading version {version}'s manifest")
        manifest = json.loads(await r.read())
    if manifest["source"]["digest"] != digest:
        return f"version {version}'s manifest names source identity {manifest['source']['digest']!r}"
    files = manifest["files"]
    sha256 = {str(f["path"]): str(f["sha256"]) for f in files if f.get("sha256")}
    if not sha256:
        return f"version {version}'s manifest records no sha256 (staged without record_sha256): it cannot be checked"
    return PeerVersion(peer, model, version, digest, sha256, {str(f["path"]): int(f["size"]) for f in files})


def _refusal(status: int, doing: str) -> str:
    if status == 401:
        return f"401 {doing}: the peer refused our token (every agent must share one peer token)"
    if status == 404:
        return f"404 {doing}: not there"
    return f"HTTP {status} {doing}"


@dataclass(frozen=True)
class PeerLoad:
    """A load that asked the peers first. `peer`: the peer version mirrored (its URL), None when no peer had the
    origin's identity; `peer_bytes`/`origin_bytes`: bytes fetched from each (the agent's
    warmpod_node_fetched_bytes_total{from="peer"|"origin"}); `peer_error`: why the peer was refused or abandoned
    mid-load (the rest came from the origin); `misses`: why each other peer asked gave nothing."""

    result: LoadResult
    peer: str | None
    peer_bytes: int
    origin_bytes: int
    peer_error: str | None
    misses: dict[str, str]


async def load_with_peers(
    req: LoadRequest,
    peers: PeerDirectory | Sequence[str],
    token: str | None,
    events: LoadEvents | None = None,
    *,
    origin_digest: str | None = None,
    timeout_s: float = 10.0,
    rng: random.Random | None = None,
) -> PeerLoad:
    """Stage `req` (the catalog's source as `uri`, its pins as `sha256`) from a peer's copy when one has the origin's
    identity, else (and for whatever the peer fails to supply) from the origin. The version is published with the
    origin's URI and identity, and every file's sha256 recorded, so this node can serve it to peers in turn.

    The origin is listed first (metadata only: LIST/HEAD), unless the caller did and passes `origin_digest`; a
    version of that identity already published here is reused without asking anyone. `events` hear the bytes from
    the origin as `bytes_done` and those from the peer as `mirror_bytes_done`. Raises the loader's errors
    (SourceNotFound when the origin is missing: a peer's copy of a source that is gone is not served)."""
    req = dataclasses.replace(req, record_sha256=True, mirror=None)
    misses: dict[str, str] = {}
    found: PeerVersion | None = None
    if token:
        digest = origin_digest or await _origin_digest(req)
        if find_version(req.root, req.model, digest) is None:
            urls: list[str] = []
            try:
                urls = list(peers) if isinstance(peers, Sequence) else await peers.peer_urls()
            except WarmpodError as e:
                misses["peer discovery"] = str(e)
            if urls:
                search = await find_peer_version(urls, req.model, digest, token, timeout_s=timeout_s, rng=rng)
                found, misses = search.found, misses | search.misses
    if found is not None:
        req = dataclasses.replace(req, mirror=found.mirror(token or ""))
    result = await load(req, events)
    return PeerLoad(
        result=result,
        peer=redact(found.url) if found else None,
        peer_bytes=result.mirror_bytes,
        origin_bytes=result.origin_bytes,
        peer_error=result.mirror_error,
        misses=misses,
    )


async def _origin_digest(req: LoadRequest) -> str:
    source = await open_source(req.uri, req.settings.concurrency)
    try:
        return source.digest
    finally:
        await source.aclose()
