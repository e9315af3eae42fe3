"""Pure parts of sources and load: file selection, redaction, source identity, error mapping, index check."""

from __future__ import annotations

import errno
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from warmpod.loader.errors import (
    AccessDenied,
    InvalidModel,
    LoaderError,
    SourceNotFound,
    TransientError,
    UsageError,
)
from warmpod.loader.load import check_weight_map
from warmpod.loader.sources import (
    MAX_AUX_FILE_BYTES,
    SourceFile,
    classify,
    file_identity,
    identity_digest,
    redact,
    select_files,
)

URI = "s3://bucket/models/tiny"


def listing(**sizes: int) -> dict[str, dict[str, Any]]:
    return {rel: {"size": size, "type": "file"} for rel, size in sizes.items()}


# ---------------------------------------------------------------- select_files


def test_select_files_takes_safetensors_and_small_companions() -> None:
    entries = {
        "model.safetensors": {"size": 90 << 20},
        "config.json": {"size": 600},
        "tokenizer.json": {"size": 700_000},
        "1_Pooling/config.json": {"size": 190},
        "pytorch_model.bin": {"size": 90 << 20},
        "model.pt": {"size": 10},
        "rust_model.ot": {"size": 10},
        "tf_model.h5": {"size": 10},
        "flax_model.msgpack": {"size": 10},
        "onnx/model.onnx": {"size": 10},
        "model.gguf": {"size": 10},
        "weights.npz": {"size": 10},
        "training_args.pkl": {"size": 10},
        ".gitattributes": {"size": 1500},
        "sub/.hidden": {"size": 1},
        "big-vocab.txt": {"size": MAX_AUX_FILE_BYTES + 1},
        "just-fits.txt": {"size": MAX_AUX_FILE_BYTES},
        "no-size.md": {},
    }
    assert select_files(entries, URI) == [
        "model.safetensors",
        "1_Pooling/config.json",
        "config.json",
        "just-fits.txt",
        "no-size.md",
        "tokenizer.json",
    ]


def test_select_files_sharded_checkpoint_keeps_its_index() -> None:
    entries = listing(
        **{
            "model-00002-of-00002.safetensors": 100,
            "model-00001-of-00002.safetensors": 100,
            "model.safetensors.index.json": 300,
            "pytorch_model-00001-of-00002.bin": 100,
        }
    )
    assert select_files(entries, URI) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]


def test_select_files_skips_files_inside_hidden_directories() -> None:
    entries = listing(
        **{
            "model.safetensors": 100,
            ".git/config": 300,
            ".git/HEAD": 20,
            ".cache/huggingface/download/model.safetensors.metadata": 100,
        }
    )
    assert select_files(entries, URI) == ["model.safetensors"]


def test_select_files_only_pickles_is_a_usage_error() -> None:
    entries = listing(**{"pytorch_model.bin": 100, "config.json": 10, "ckpt/model.ckpt": 5})
    with pytest.raises(UsageError) as info:
        select_files(entries, URI)
    message = str(info.value)
    assert message.startswith(URI)
    assert "pickle" in message and "safetensors" in message
    assert "pytorch_model.bin" in message
    assert info.value.exit_code == 2


@pytest.mark.parametrize("entries", [{}, listing(**{"config.json": 10, "model.onnx": 100})])
def test_select_files_nothing_loadable_is_not_found(entries: dict[str, dict[str, Any]]) -> None:
    with pytest.raises(SourceNotFound, match=r"s3://bucket/models/tiny: no \.safetensors files found"):
        select_files(entries, URI)


# ---------------------------------------------------------------- redact


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (
            "https://user:secret@host.example:8443/m/model.safetensors",
            "https://host.example:8443/m/model.safetensors",
        ),
        ("https://token@host.example/m", "https://host.example/m"),
        (
            "https://host.example/m.safetensors?X-Amz-Signature=abc&X-Amz-Credential=k",
            "https://host.example/m.safetensors",
        ),
        ("https://host.example/m#frag", "https://host.example/m"),
        ("s3://AKIAXXXX:secret@bucket/models/tiny", "s3://bucket/models/tiny"),
        ("s3://bucket/models/tiny", "s3://bucket/models/tiny"),
        ("gs://bucket/m?generation=5", "gs://bucket/m"),
        ("file:///models/tiny", "file:///models/tiny"),
    ],
)
def test_redact_strips_credentials_and_queries(uri: str, expected: str) -> None:
    assert redact(uri) == expected


@pytest.mark.parametrize(
    "path", ["/models/tiny", "relative/dir", "/data/weird?name@x", "./user:pw@host", "C:\\models\\tiny", ""]
)
def test_redact_leaves_local_paths_alone(path: str) -> None:
    assert redact(path) == path


def test_redact_keeps_ipv6_hosts_valid() -> None:
    assert redact("http://u:p@[::1]:8080/m?sig=1") == "http://[::1]:8080/m"


# ---------------------------------------------------------------- identity


def test_file_identity_keeps_size_and_change_markers() -> None:
    info = {
        "name": "bucket/m.safetensors",
        "size": 1234,
        "ETag": '"abc"',
        "mtime": 1700000000.5,
        "VersionId": None,
        "type": "file",
        "StorageClass": "STANDARD",
    }
    assert file_identity(info) == {"size": "1234", "ETag": '"abc"', "mtime": "1700000000.5"}


def test_file_identity_without_size() -> None:
    assert file_identity({"size": None}) == {"size": "0"}
    assert file_identity({}) == {"size": "0"}


def source_file(rel: str, size: int, etag: str) -> SourceFile:
    return SourceFile(rel, f"bucket/{rel}", size, file_identity({"size": size, "ETag": etag}))


def test_identity_digest_is_order_independent() -> None:
    files = [source_file("a.safetensors", 10, "e1"), source_file("config.json", 2, "e2")]
    digest = identity_digest(files)
    assert len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
    assert identity_digest(reversed(files)) == digest
    assert identity_digest(list(files)) == digest


def test_identity_digest_changes_with_any_file() -> None:
    base = [source_file("a.safetensors", 10, "e1"), source_file("config.json", 2, "e2")]
    digest = identity_digest(base)
    assert identity_digest([source_file("a.safetensors", 11, "e1"), base[1]]) != digest  # size
    assert identity_digest([source_file("a.safetensors", 10, "e9"), base[1]]) != digest  # etag
    assert identity_digest([source_file("b.safetensors", 10, "e1"), base[1]]) != digest  # name
    assert identity_digest(base[:1]) != digest  # a file fewer


# ---------------------------------------------------------------- classify


def http_error(status: int) -> aiohttp.ClientResponseError:
    url = URL("http://127.0.0.1/m.safetensors")
    info = aiohttp.RequestInfo(url, "GET", CIMultiDictProxy(CIMultiDict()), url)
    return aiohttp.ClientResponseError(info, (), status=status, message="reason")


WHERE = "s3://bucket/m: model.safetensors"


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (FileNotFoundError(2, "nope"), SourceNotFound),
        (PermissionError(13, "denied"), AccessDenied),
        (http_error(401), AccessDenied),
        (http_error(403), AccessDenied),
        (http_error(404), SourceNotFound),
        (http_error(410), SourceNotFound),
        (http_error(500), TransientError),
        (http_error(502), TransientError),
        (http_error(503), TransientError),
        (http_error(429), TransientError),
        (ConnectionResetError(errno.ECONNRESET, "reset"), TransientError),
        (TimeoutError(), TransientError),
        (TimeoutError(), TransientError),
        (aiohttp.ServerDisconnectedError(), TransientError),
        (aiohttp.ClientConnectionError("refused"), TransientError),
    ],
)
def test_classify(exc: BaseException, kind: type[LoaderError]) -> None:
    err = classify(exc, WHERE)
    assert type(err) is kind
    assert str(err).startswith(WHERE)


@pytest.mark.parametrize(
    "exc",
    [
        http_error(400),
        OSError(errno.ENOSPC, "No space left"),
        IsADirectoryError(21, "dir"),
        ValueError("x"),
    ],
)
def test_classify_permanent_failures_are_not_retried(exc: BaseException) -> None:
    err = classify(exc, WHERE)
    assert type(err) is LoaderError
    assert not isinstance(err, TransientError)
    assert str(err).startswith(WHERE)


def test_classify_status_in_message() -> None:
    assert "HTTP 403" in str(classify(http_error(403), WHERE))
    assert "HTTP 503" in str(classify(http_error(503), WHERE))


def test_classify_passes_loader_errors_through() -> None:
    original = InvalidModel("bad header")
    assert classify(original, WHERE) is original


# ---------------------------------------------------------------- check_weight_map


def tensors_in(**files: str) -> dict[str, dict[str, Any]]:
    return {name: {"file": file, "dtype": "F32", "shape": [1], "offsets": [0, 4]} for name, file in files.items()}


SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def test_weight_map_that_agrees_passes() -> None:
    tensors = tensors_in(a=SHARD1, b=SHARD1, c=SHARD2)
    check_weight_map({"metadata": {"total_size": 12}, "weight_map": {"a": SHARD1, "b": SHARD1, "c": SHARD2}}, tensors)


def test_weight_map_tensor_in_the_wrong_shard() -> None:
    tensors = tensors_in(a=SHARD1, b=SHARD2)
    with pytest.raises(InvalidModel, match=f"maps tensor 'b' to {SHARD1}, but it is in {SHARD2}"):
        check_weight_map({"weight_map": {"a": SHARD1, "b": SHARD1}}, tensors)


def test_weight_map_tensor_no_shard_holds() -> None:
    with pytest.raises(InvalidModel, match=rf"maps tensor 'ghost' to {SHARD2}, but no shard holds it"):
        check_weight_map({"weight_map": {"a": SHARD1, "ghost": SHARD2}}, tensors_in(a=SHARD1))


def test_weight_map_missing_a_tensor_the_shards_hold() -> None:
    tensors = tensors_in(a=SHARD1, extra=SHARD2)
    with pytest.raises(InvalidModel, match="shards hold tensors the index does not list: extra") as info:
        check_weight_map({"weight_map": {"a": SHARD1}}, tensors)
    assert "model.safetensors.index.json" in str(info.value)


class _StatusError(Exception):
    """Shaped like the SDKs' errors: Azure's HttpResponseError has .status_code, gcsfs's HttpError .code."""

    def __init__(self, attr: str, status: int) -> None:
        super().__init__(f"HTTP {status}")
        setattr(self, attr, status)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (_StatusError("status_code", 403), AccessDenied),
        (_StatusError("status_code", 404), SourceNotFound),
        (_StatusError("status_code", 503), TransientError),
        (_StatusError("code", 429), TransientError),
        (_StatusError("code", 401), AccessDenied),
        (OSError("Forbidden: https://storage.googleapis.com/b/o\nno access"), AccessDenied),
    ],
)
def test_classify_reads_statuses_of_every_backend(exc: BaseException, expected: type[LoaderError]) -> None:
    assert type(classify(exc, "gs://b/o")) is expected
