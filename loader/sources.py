"""Where weights come from: a local path or any fsspec URL (s3://, gs://, az://, http(s)://), read in ranges.

`open_source` resolves a URI into a `Source`: the files of the model (one .safetensors file, or an HF-style
directory) with their sizes and identities, and a way to read any byte range of them. Object-store credentials and
endpoints come from each library's standard environment/config (for S3: AWS_* variables, ~/.aws, instance roles;
`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` for S3-compatible stores) and are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import http.client
import inspect
import json
import os
import posixpath
import weakref
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fsspec

from warmpod.errors import WarmpodError
from warmpod.loader.errors import AccessDenied, LoaderError, ShortRead, SourceNotFound, TransientError, UsageError

# Files a model directory may carry besides its weights; anything larger than this is not "small".
MAX_AUX_FILE_BYTES = 64 << 20
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Weight formats we do not stage (they are neither safetensors nor small config files).
SKIPPED_SUFFIXES = (*PICKLE_SUFFIXES, ".h5", ".msgpack", ".onnx", ".gguf", ".ot", ".tflite", ".npz")
INDEX_FILE = "model.safetensors.index.json"
# What an HTTP "directory" is probed for when the server offers no listing.
HTTP_PROBE_FILES = (
    INDEX_FILE,
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
    "warmpod.json",
)
# Keys of fsspec's `info()` that change when an object's content changes, per backend.
IDENTITY_KEYS = (
    "ETag",
    "etag",
    "VersionId",
    "generation",
    "md5Hash",
    "mtime",
    "LastModified",
    "last_modified",
)


@dataclass(frozen=True)
class SourceFile:
    """One file of a model: `rel` is its path inside the model directory, `path` what the filesystem calls it."""

    rel: str
    path: str
    size: int
    identity: dict[str, str] = field(default_factory=dict)

    @property
    def is_safetensors(self) -> bool:
        return self.rel.endswith(".safetensors")


def redact(uri: str) -> str:
    """A URI fit for logs and manifests: user info and query strings (presigned credentials) removed."""
    parts = urlsplit(uri)
    if not parts.scheme or len(parts.scheme) == 1:
        return uri
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def file_identity(info: dict[str, Any]) -> dict[str, str]:
    ident = {"size": str(int(info.get("size") or 0))}
    for key in IDENTITY_KEYS:
        if info.get(key) is not None:
            ident[key] = str(info[key])
    return ident


def plain_md5(identity: dict[str, str]) -> str | None:
    """The MD5 of a file's bytes when its ETag is one: S3 gives a single-part upload's MD5 as its ETag (32 hex);
    a multipart ETag ("...-N") and other backends' opaque tags say nothing about the bytes. (An SSE-KMS or SSE-C
    encrypted S3 object's ETag also looks like 32 hex but is not its MD5: a mirror of one is refused, safely.)"""
    etag = (identity.get("ETag") or identity.get("etag") or "").strip('"').lower()
    if len(etag) == 32 and all(c in "0123456789abcdef" for c in etag):
        return etag
    return None


def identity_digest(files: Iterable[SourceFile], dtype: str | None = None) -> str:
    """A digest of what the source holds now: the same files with the same identities give the same digest.

    With `dtype` (a load that converts its floating-point tensors to it), the digest of that staging of the source:
    a bf16 and an as-is staging of the same files differ, so neither is ever reused for the other."""
    files_canon = sorted((f.rel, f.identity) for f in files)
    canon = json.dumps(files_canon if dtype is None else {"files": files_canon, "dtype": dtype}, sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()


def select_files(entries: dict[str, dict[str, Any]], uri: str) -> list[str]:
    """Choose the files to stage from a listing {relative path: info}: safetensors plus small companions.

    Pure: decides only from names and sizes. Raises when nothing loadable is there.
    """
    weights = sorted(rel for rel in entries if rel.endswith(".safetensors"))
    if not weights:
        pickles = sorted(rel for rel in entries if rel.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise UsageError(
                f"{uri}: only pickle checkpoints found ({', '.join(pickles[:3])}); warmpod never unpickles weights. "
                "Convert them to safetensors first (e.g. safetensors.torch.save_file(torch.load(f), "
                "'model.safetensors') in a trusted environment) and point the loader at the result"
            )
        raise SourceNotFound(f"{uri}: no .safetensors files found")
    aux = sorted(
        rel
        for rel, info in entries.items()
        if not rel.endswith((".safetensors", *SKIPPED_SUFFIXES))
        and not any(part.startswith(".") for part in rel.split("/"))  # .git/, .cache/huggingface/, ...
        and int(info.get("size") or 0) <= MAX_AUX_FILE_BYTES
    )
    return weights + aux


class Source:
    """A model's files on some filesystem, readable by byte range. Use `open_source`; close with `aclose`."""

    def __init__(self, uri: str, fs: Any, files: list[SourceFile]) -> None:
        self.uri = uri
        self.fs = fs
        self.files = files

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    @property
    def is_http(self) -> bool:
        return bool({"http", "https"} & set(_protocols(self.fs)))

    @property
    def digest(self) -> str:
        return identity_digest(self.files)

    async def read_range(self, f: SourceFile, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of `f`; raises SourceNotFound/AccessDenied/TransientError."""
        if length == 0:
            return b""
        try:
            if self.is_local:
                data = await asyncio.to_thread(_pread_all, f.path, offset, length)
            elif self.fs.async_impl:
                data = await self.fs._cat_file(f.path, start=offset, end=offset + length)
            else:
                data = await asyncio.to_thread(self.fs.cat_file, f.path, start=offset, end=offset + length)
        except Exception as e:
            raise classify(e, f"{redact(self.uri)}: {f.rel}") from e
        if len(data) > length:
            raise LoaderError(
                f"{redact(self.uri)}: {f.rel}: asked for {length} bytes at offset {offset}, got {len(data)}: "
                "the server ignores HTTP Range requests; use a server that supports them"
            )
        if len(data) < length:
            raise ShortRead(
                f"{redact(self.uri)}: {f.rel}: short read: {len(data)} of {length} bytes at offset {offset}"
            )
        return bytes(data)

    async def stream_range(self, f: SourceFile, offset: int, length: int) -> AsyncIterator[bytes]:
        """The bytes of a range in the pieces the network delivers them (no whole-range buffer, no join copy),
        for S3 and HTTP; other backends yield the range as one piece. The caller checks the total length."""
        where = f"{redact(self.uri)}: {f.rel}"
        try:
            if {"s3", "s3a"} & set(_protocols(self.fs)):
                bucket, key, version = self.fs.split_path(f.path)
                extra = {"VersionId": version} if version else {}
                rng = f"bytes={offset}-{offset + length - 1}"
                resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key, Range=rng, **extra)
                body = resp["Body"]
                try:
                    async for piece in body.raw_stream.content.iter_any():
                        yield piece
                finally:
                    body.close()
            elif self.is_http:
                session = await self.fs.set_session()
                headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
                async with session.get(self.fs.encode_url(f.path), headers=headers) as r:
                    if r.status == 404:
                        raise FileNotFoundError(f.path)
                    r.raise_for_status()
                    if r.status != 206 and length != f.size:
                        raise LoaderError(f"{where}: the server ignores HTTP Range requests (answered {r.status})")
                    async for piece in r.content.iter_any():
                        yield piece
            else:
                yield await self.read_range(f, offset, length)
        except WarmpodError:
            raise
        except Exception as e:
            raise classify(e, where) from e

    async def refresh(self) -> list[SourceFile]:
        """The same files' current sizes and identities (to detect a source that changed mid-load)."""
        _invalidate(self.fs)
        out = []
        for f in self.files:
            try:
                info = await self._info(f.path)
            except Exception as e:
                raise classify(e, f"{redact(self.uri)}: {f.rel}") from e
            out.append(SourceFile(f.rel, f.path, int(info.get("size") or 0), file_identity(info)))
        return out

    async def _info(self, path: str) -> dict[str, Any]:
        if self.fs.async_impl:
            return dict(await self.fs._info(path))
        return dict(await asyncio.to_thread(self.fs.info, path))

    async def aclose(self) -> None:
        session = getattr(self.fs, "_session", None)  # fsspec's HTTP filesystem
        if session is not None and not session.closed:
            await session.close()
        s3 = getattr(self.fs, "_s3", None)  # s3fs
        if s3 is not None:
            await s3.__aexit__(None, None, None)
            self.fs._s3 = None
        service_client = getattr(self.fs, "service_client", None)  # adlfs
        if service_client is not None:
            await service_client.close()
            close_credential = getattr(self.fs.credential, "close", None)
            if close_credential is not None and inspect.iscoroutinefunction(close_credential):
                await close_credential()
            # adlfs's own finalizers would close them again at exit through a loop that async mode leaves
            # unset, printing "RuntimeError: Loop is not running" (fsspec/adlfs#495): they are closed already.
            for finalizer in list(getattr(weakref.finalize, "_registry", {})):
                target = finalizer.peek()
                if target is not None and target[0] is self.fs:
                    finalizer.detach()


class MirrorSource(Source):
    """The files of another source read from a mirror (an HTTP server holding a copy, e.g. a peer node), so that
    the origin's listing decides what is staged and the mirror only supplies bytes. Its identities are the
    origin's: a mirror is checked by digests, never by its own ETags, so `refresh` does not ask it. Once `end`ed
    it sends no request more: every read fails at once."""

    ended: str | None = None

    def end(self, reason: str) -> None:
        if self.ended is None:
            self.ended = reason

    async def read_range(self, f: SourceFile, offset: int, length: int) -> bytes:
        self._check_in_use(f)
        try:
            return await super().read_range(f, offset, length)
        except Exception as e:  # ended at once, before the ranges waiting for this one's buffer can start
            self.end(str(e))
            raise

    async def stream_range(self, f: SourceFile, offset: int, length: int) -> AsyncIterator[bytes]:
        self._check_in_use(f)
        try:
            async for piece in super().stream_range(f, offset, length):
                yield piece
        except Exception as e:
            self.end(str(e))
            raise

    async def refresh(self) -> list[SourceFile]:
        return list(self.files)

    def _check_in_use(self, f: SourceFile) -> None:
        if self.ended is not None:
            raise LoaderError(f"{redact(self.uri)}: {f.rel}: the mirror is no longer used ({self.ended})")


async def open_mirror(url: str, files: Iterable[SourceFile], headers: Mapping[str, str]) -> MirrorSource:
    """The origin's `files` at `url` + "/" + their relative path, over HTTP(S) with `headers` on every request
    (a bearer token: kept in the session, never in a URI, a message or a log). Nothing is requested here."""
    import aiohttp

    protocol = fsspec.core.split_protocol(url)[0]
    if protocol not in ("http", "https"):
        raise UsageError(f"{redact(url)}: a mirror must be an http(s):// URL")
    # Short timeouts: a silent mirror must not hold the load up long, the origin is there to fall back on.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30)
    fs = fsspec.get_filesystem_class(protocol)(
        skip_instance_cache=True, asynchronous=True, client_kwargs={"headers": dict(headers), "timeout": timeout}
    )
    await fs.set_session()
    base = url.rstrip("/")
    return MirrorSource(url, fs, [SourceFile(f.rel, f"{base}/{f.rel}", f.size, f.identity) for f in files])


def _protocols(fs: Any) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def _invalidate(fs: Any) -> None:
    with contextlib.suppress(Exception):  # a filesystem without a cache has nothing to invalidate
        fs.invalidate_cache()


def _pread_all(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def storage_options(protocol: str, concurrency: int) -> dict[str, Any]:
    """Per-backend options: our own retry loop is the only one (no nested retry storms), pools fit concurrency."""
    if protocol in ("s3", "s3a"):
        opts: dict[str, Any] = {
            "config_kwargs": {
                "retries": {"total_max_attempts": 1, "mode": "standard"},
                "max_pool_connections": max(10, concurrency * 2),
                "connect_timeout": 10,
                "read_timeout": 60,
            },
        }
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["endpoint_url"] = endpoint
        return opts
    if protocol in ("http", "https"):
        import aiohttp  # only HTTP sources need it: a local load skips its ~80 ms import

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)}}
    if protocol in ("gs", "gcs"):
        # Like google-cloud-storage: an emulator (STORAGE_EMULATOR_HOST) is reached anonymously unless a token
        # is configured (FSSPEC_GS_TOKEN); gcsfs alone first asks the GCE metadata server for credentials.
        token_configured = any("token" in fsspec.config.conf.get(p, {}) for p in ("gs", "gcs"))
        if os.environ.get("STORAGE_EMULATOR_HOST") and not token_configured:
            return {"token": "anon"}
    return {}


async def open_source(uri: str, concurrency: int = 8) -> Source:
    """Resolve `uri` to the files to stage. Raises SourceNotFound, AccessDenied, UsageError, TransientError."""
    protocol = fsspec.core.split_protocol(uri)[0] or "file"
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as e:
        raise UsageError(f"{redact(uri)}: no filesystem for {protocol}:// ({e})") from None
    opts = storage_options(protocol, concurrency)
    if cls.async_impl:
        opts["asynchronous"] = True
    fs = cls(skip_instance_cache=True, **opts)
    if hasattr(fs, "retries"):
        fs.retries = 1  # s3fs retries inside each call; ours is the one retry loop
    if cls.async_impl and hasattr(fs, "set_session"):
        await fs.set_session()
    path = fs._strip_protocol(uri)
    source = Source(uri, fs, [])
    try:
        source.files = await _list_files(source, path)
    except BaseException:
        await source.aclose()
        raise
    return source


async def _list_files(source: Source, path: str) -> list[SourceFile]:
    fs, uri = source.fs, redact(source.uri)
    try:
        info = await source._info(path)
    except FileNotFoundError:
        info = None  # an HTTP "directory" often has no page of its own
    except Exception as e:
        error = classify(e, uri)
        if not (source.is_http and isinstance(error, AccessDenied) and not path.endswith(".safetensors")):
            raise error from e
        info = None  # a directory without an index page (nginx without autoindex answers 403): probe by name
    # Over HTTP a directory is a page: fsspec calls it a file, its listing is the page's links.
    is_page = info is not None and str(info.get("mimetype", "")).startswith("text/html")
    if info is not None and info.get("type") == "file" and not is_page:
        if not path.endswith(".safetensors"):
            select_files({posixpath.basename(path): info}, uri)  # raises the right error for a lone pickle
            raise UsageError(f"{uri}: a single-file source must be a .safetensors file")
        return [SourceFile(posixpath.basename(path), path, int(info["size"]), file_identity(info))]

    entries = await _listing(source, path, exists=info is not None)
    if INDEX_FILE in entries:
        await _check_index(source, path, entries)
    chosen = select_files(entries, uri)
    return [
        SourceFile(rel, _join(fs, path, rel), int(entries[rel]["size"]), file_identity(entries[rel])) for rel in chosen
    ]


def _join(fs: Any, root: str, rel: str) -> str:
    return root.rstrip("/") + "/" + rel


async def _listing(source: Source, path: str, exists: bool) -> dict[str, dict[str, Any]]:
    fs, uri = source.fs, redact(source.uri)
    entries: dict[str, dict[str, Any]] = {}
    if exists:
        try:
            found = (
                await fs._find(path, detail=True)
                if fs.async_impl
                else await asyncio.to_thread(fs.find, path, detail=True)
            )
        except FileNotFoundError:
            found = {}
        except Exception as e:
            if not source.is_http:
                raise classify(e, uri) from e
            found = {}
        prefix = path.rstrip("/") + "/"
        for name, info in found.items():
            if info.get("type", "file") == "file" and name.startswith(prefix):
                entries[name[len(prefix) :]] = info
    if not entries and source.is_http:
        for rel in HTTP_PROBE_FILES:
            try:
                entries[rel] = await source._info(_join(fs, path, rel))
            except FileNotFoundError:
                continue
            except Exception as e:
                raise classify(e, f"{uri}/{rel}") from e
    # HTTP listings carry names only: ask each file for its size and ETag (HEAD requests, concurrently).
    unsized = [rel for rel, info in entries.items() if info.get("size") is None]
    infos = await asyncio.gather(*(source._info(_join(fs, path, rel)) for rel in unsized), return_exceptions=True)
    for rel, info in zip(unsized, infos, strict=True):
        if isinstance(info, BaseException):
            raise classify(info, f"{uri}/{rel}") from info
        entries[rel] = info
    if not entries:
        if not exists:
            raise SourceNotFound(f"{uri}: not found")
        raise SourceNotFound(f"{uri}: directory is empty")
    return entries


async def _check_index(source: Source, path: str, entries: dict[str, dict[str, Any]]) -> None:
    """A sharded checkpoint's index must name shards that are there (HTTP sources learn their shards here)."""
    uri = redact(source.uri)
    index_path = _join(source.fs, path, INDEX_FILE)
    try:
        raw = await source.fs._cat_file(index_path) if source.fs.async_impl else source.fs.cat_file(index_path)
        weight_map = json.loads(raw)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise LoaderError(f"{uri}: {INDEX_FILE} is not a valid index ({e})") from None
    except Exception as e:
        raise classify(e, f"{uri}/{INDEX_FILE}") from e
    for shard in shards:
        if shard in entries:
            continue
        try:
            entries[shard] = await source._info(_join(source.fs, path, shard))
        except FileNotFoundError:
            raise SourceNotFound(f"{uri}: {INDEX_FILE} names shard {shard!r}, which is not found") from None
        except Exception as e:
            raise classify(e, f"{uri}/{shard}") from e


@functools.cache
def _transient_errors() -> tuple[type[BaseException], ...]:
    """Network-level failures of any backend: resets, timeouts, truncated bodies. Built on the first error, so a
    load that never fails never imports aiohttp for it."""
    from aiohttp import ClientError  # under fsspec's HTTP, s3fs, gcsfs and adlfs alike; not an OSError

    errors: list[type[BaseException]] = [OSError, asyncio.TimeoutError, ClientError, http.client.HTTPException]
    try:  # botocore (under s3fs) has its own hierarchy, outside OSError
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError, IncompleteReadError

        errors += [BotoConnectionError, HTTPClientError, IncompleteReadError]
    except ImportError:
        pass
    return tuple(errors)


# Errors from fsspec backends → ours. Anything not clearly permanent is worth a retry.
_PERMANENT_HTTP = {
    400: "bad request",
    401: "unauthorized",
    403: "access denied",
    404: "not found",
    410: "gone",
}


def classify(exc: BaseException, where: str) -> WarmpodError:
    """Map a backend exception to a LoaderError; TransientError means "retry may help"."""
    if isinstance(exc, WarmpodError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return SourceNotFound(f"{where}: not found")
    if isinstance(exc, PermissionError) or (isinstance(exc, OSError) and str(exc).startswith("Forbidden:")):
        # s3fs raises PermissionError for 403; gcsfs a plain OSError("Forbidden: ...").
        return AccessDenied(f"{where}: access denied (check credentials and permissions)")
    status = _http_status(exc)
    if status is not None:
        if status in (401, 403):
            return AccessDenied(f"{where}: access denied (HTTP {status})")
        if status in (404, 410):
            return SourceNotFound(f"{where}: not found (HTTP {status})")
        if status == 416:
            return ShortRead(f"{where}: short read: range not satisfiable (HTTP 416)")
        if status in _PERMANENT_HTTP:
            return LoaderError(f"{where}: HTTP {status} {_PERMANENT_HTTP[status]}: {exc}")
        if status >= 500 or status in (408, 429):
            return TransientError(f"{where}: HTTP {status}: {exc}")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EROFS, errno.EISDIR, errno.ENOTDIR):
        return LoaderError(f"{where}: {exc}")
    if isinstance(exc, _transient_errors()):
        return TransientError(f"{where}: {type(exc).__name__}: {exc}")
    return LoaderError(f"{where}: {type(exc).__name__}: {exc}")


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status an exception carries: aiohttp's `.status`, Azure's `.status_code`, gcsfs's `.code`."""
    for attr in ("status", "status_code", "code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value <= 599:
            return value
    return None
