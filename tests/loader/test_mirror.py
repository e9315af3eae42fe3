"""Mirror loads (LoadRequest.mirror): the origin's listing decides what is staged, the bytes come from a mirror that
is trusted for nothing, and any failure of the mirror sends the rest to the origin. Origin and mirror are Range
servers on 127.0.0.1 serving two copies of a model, so each side's requests can be counted."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.kit.http_range import RangeHTTPServer
from tests.kit.models import tree_digests, write_model_dir
from warmpod.loader.load import LoadEvents, LoadRequest, LoadResult, Mirror, load, plan_mirror
from warmpod.loader.sources import SourceFile, open_source, plain_md5
from warmpod.loader.stream import StreamSettings
from warmpod.store import read_manifest

SMALL_CHUNKS = StreamSettings(chunk_size=16 << 10, max_buffer_bytes=256 << 10)


def digest_of(uri: str) -> str:
    async def go() -> str:
        source = await open_source(uri)
        try:
            return source.digest
        finally:
            await source.aclose()

    return asyncio.run(go())


def weight_gets(server: RangeHTTPServer) -> int:
    return sum(1 for r in server.requests.records() if r.method == "GET" and r.path.endswith(".safetensors"))


def staged(store: Path, model: str) -> dict[str, str]:
    digests = tree_digests(store / model / "current")
    del digests["manifest.json"]
    return digests


class Told(LoadEvents):
    """What a load told its events: bytes by where they came from, and why the mirror was abandoned."""

    def __init__(self) -> None:
        self.origin = self.mirror = 0
        self.abandoned: list[tuple[str, str]] = []

    def bytes_done(self, n: int) -> None:
        self.origin += n

    def mirror_bytes_done(self, n: int) -> None:
        self.mirror += n

    def mirror_abandoned(self, mirror: str, reason: str) -> None:
        self.abandoned.append((mirror, reason))


class TwoCopies:
    """The same model behind two Range servers: `origin` (the source) and `mirror` (a copy, tampered at will)."""

    def __init__(self, tmp_path: Path, http_server: Callable[..., RangeHTTPServer], shards: int = 2) -> None:
        self.src = write_model_dir(tmp_path / "origin" / "model", seed=3, scale=4, shards=shards)
        self.copy = tmp_path / "mirror" / "model"
        shutil.copytree(self.src, self.copy)
        self.origin = http_server(tmp_path / "origin")
        self.mirror_server = http_server(tmp_path / "mirror")
        self.uri = self.origin.url_for("model/")
        self.expected = tree_digests(self.src)
        self.store = tmp_path / "store"

    def mirror(self, **changes: object) -> Mirror:
        sizes = {rel: (self.copy / rel).stat().st_size for rel in self.expected}
        fields: dict[str, object] = {
            "url": self.mirror_server.url_for("model"),
            "digest": digest_of(self.uri),
            "sha256": tree_digests(self.copy),
            "sizes": sizes,
            "headers": {"Authorization": "Bearer mirror-token-0xBEEF"},
        }
        return Mirror(**(fields | changes))  # type: ignore[arg-type]

    def load(self, mirror: Mirror | None, events: LoadEvents | None = None, **req: object) -> LoadResult:
        request = LoadRequest(uri=self.uri, model="m", root=self.store, settings=SMALL_CHUNKS, mirror=mirror, **req)  # type: ignore[arg-type]
        return asyncio.run(load(request, events))


@pytest.fixture
def copies(tmp_path: Path, http_server: Callable[..., RangeHTTPServer]) -> TwoCopies:
    return TwoCopies(tmp_path, http_server)


@pytest.mark.emulator
def test_a_mirror_load_takes_every_byte_from_the_mirror_and_records_the_origin(copies: TwoCopies) -> None:
    told = Told()
    result = copies.load(copies.mirror(), told)

    assert weight_gets(copies.origin) == 0  # the origin was listed (HTML page, HEADs), never read
    assert weight_gets(copies.mirror_server) > 0
    assert staged(copies.store, "m") == copies.expected
    total = sum((copies.src / rel).stat().st_size for rel in copies.expected)
    assert (told.mirror, told.origin, told.abandoned) == (total, 0, [])  # the bytes staged
    assert result.mirror_bytes > total and result.origin_bytes == 0  # the bytes fetched: the headers too
    assert result.mirror_error is None
    manifest = read_manifest(copies.store, "m", result.version)
    assert manifest["source"]["uri"] == copies.uri and manifest["source"]["digest"] == digest_of(copies.uri)
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == copies.expected  # every file's sha256 recorded
    assert result.to_json()["mirror"] == copies.mirror_server.url_for("model")


@pytest.mark.emulator
def test_a_tampered_file_ends_the_mirror_and_the_origin_supplies_the_rest(copies: TwoCopies) -> None:
    shard = "model-00001-of-00002.safetensors"
    data = bytearray((copies.copy / shard).read_bytes())
    data[-100] ^= 0xFF  # same size, one weight byte off: only the digest can tell
    (copies.copy / shard).write_bytes(bytes(data))

    result = copies.load(copies.mirror(sha256=copies.expected))  # the manifest is the true one, the bytes are not

    assert result.mirror_error is not None and result.mirror_error.startswith(f"{shard}: its bytes do not match")
    assert staged(copies.store, "m") == copies.expected  # the mismatching file was rewritten from the origin
    assert weight_gets(copies.origin) >= 1
    assert not (copies.store / "m" / "staging").exists() or not any((copies.store / "m" / "staging").iterdir())


@pytest.mark.emulator
def test_a_mirror_that_is_gone_sends_everything_to_the_origin(copies: TwoCopies) -> None:
    told = Told()
    result = copies.load(copies.mirror(url=copies.mirror_server.url_for("nowhere")), told)

    assert staged(copies.store, "m") == copies.expected
    assert result.mirror_error is not None and "not found" in result.mirror_error
    assert result.mirror_bytes == 0 and result.origin_bytes > 0
    assert len(told.abandoned) == 1  # told once, however many files were in flight


@pytest.mark.emulator
def test_a_mirror_of_another_identity_is_not_asked(copies: TwoCopies) -> None:
    result = copies.load(copies.mirror(digest="0" * 64))

    assert result.mirror_error == f"it holds source identity {'0' * 16}, the origin is now {digest_of(copies.uri)[:16]}"
    assert copies.mirror_server.requests.records() == []
    assert staged(copies.store, "m") == copies.expected


@pytest.mark.emulator
def test_record_sha256_without_a_mirror_records_every_file(copies: TwoCopies) -> None:
    result = copies.load(None, record_sha256=True)
    manifest = read_manifest(copies.store, "m", result.version)
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == copies.expected
    assert "mirror" not in result.to_json()


# ---------------------------------------------------------------- pure rules


def files(**sizes: int) -> list[SourceFile]:
    return [SourceFile(rel, rel, size) for rel, size in sizes.items()]


SHA_A, SHA_B = "a" * 64, "b" * 64


@pytest.mark.unit
def test_plan_mirror_takes_the_files_it_can_check_and_refuses_a_mirror_that_contradicts_the_origin() -> None:
    fs = files(w=10, c=2)
    assert plan_mirror(fs, "d", Mirror("http://m", "d", {"w": SHA_A, "c": SHA_B}), {}) == (frozenset({"w", "c"}), None)
    # a file without a sha256 (or with something else) is left to the origin
    assert plan_mirror(fs, "d", Mirror("http://m", "d", {"w": SHA_A, "c": "xyz"}), {}) == (frozenset({"w"}), None)
    assert plan_mirror(fs, "d", Mirror("http://m", "d", {}), {}) == (
        frozenset(),
        "it names no sha256 for any file of the source",
    )
    assert plan_mirror(fs, "d", Mirror("http://m", "e", {"w": SHA_A}), {})[1] == (
        "it holds source identity e, the origin is now d"
    )
    assert plan_mirror(fs, "d", Mirror("http://m", "d", {"w": SHA_A}, sizes={"w": 11}), {})[1] == (
        "w is 11 bytes there, 10 at the origin"
    )
    assert plan_mirror(fs, "d", Mirror("http://m", "d", {"w": SHA_A}), {"w": SHA_B.upper()})[1] == (
        f"w: its sha256 {SHA_A} is not the pinned {SHA_B}"
    )


@pytest.mark.unit
def test_only_a_plain_md5_etag_counts_as_the_bytes_md5() -> None:
    md5 = "5eb63bbbe01eeed093cb22bb8f5acdc3"
    assert plain_md5({"ETag": f'"{md5}"'}) == md5  # S3 single-part
    assert plain_md5({"etag": md5.upper()}) == md5
    assert plain_md5({"ETag": f'"{md5}-3"'}) is None  # multipart
    assert plain_md5({"ETag": '"0x8DC2B1E3F4A5B6C"'}) is None  # Azure
    assert plain_md5({"mtime": "1"}) is None


@pytest.mark.unit
def test_a_mirrors_headers_never_show() -> None:
    mirror = Mirror("http://m", "d", {}, headers={"Authorization": "Bearer s3cr3t"})
    request = LoadRequest(uri="/x", model="m", root=Path("/tmp/x"), mirror=mirror)
    assert "s3cr3t" not in repr(request) and "s3cr3t" not in json.dumps(LoadResult(
        "m", "1", Path("/x"), "d", 0, 0.0, reused=True, mirror="http://m").to_json())  # fmt: skip
