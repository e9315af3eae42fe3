"""Safetensors header rules: every rule `warmpod.safetensors_header` enforces, on hand-made headers and real files."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from safetensors import safe_open

from warmpod.safetensors_header import MAX_HEADER_BYTES, Header, TensorInfo, header_length, parse_header
from warmpod.store import InvalidWeights

FILE = "shard-00001.safetensors"


def spec(dtype: str, shape: list[Any], begin: Any, end: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def encode(entries: dict[str, Any]) -> bytes:
    return json.dumps(entries).encode()


def parse(entries: dict[str, Any], file_size: int | None = None) -> Header:
    return parse_header(encode(entries), FILE, file_size)


def rejects(entries: dict[str, Any] | bytes, *fragments: str, file_size: int | None = None) -> str:
    """Parse, expect InvalidWeights; the message must name the file and contain every fragment."""
    raw = entries if isinstance(entries, bytes) else encode(entries)
    with pytest.raises(InvalidWeights) as info:
        parse_header(raw, FILE, file_size)
    message = str(info.value)
    assert message.startswith(f"{FILE}: "), message
    for fragment in fragments:
        assert fragment in message, message
    return message


def split(data: bytes, file: str = FILE) -> Header:
    """Parse a whole safetensors file as the loader does: prefix, then header, checked against the size."""
    n = header_length(data[:8], file)
    return parse_header(data[8 : 8 + n], file, len(data))


# ---------------------------------------------------------------- the 8-byte prefix


def test_header_length_reads_little_endian_u64() -> None:
    assert header_length(struct.pack("<Q", 1234) + b"{}", FILE) == 1234


@pytest.mark.parametrize("prefix", [b"", b"\x01", b"\x00" * 7])
def test_prefix_shorter_than_8_bytes(prefix: bytes) -> None:
    with pytest.raises(InvalidWeights, match="shorter than the 8-byte safetensors prefix") as info:
        header_length(prefix, FILE)
    assert FILE in str(info.value)
    assert f"file is {len(prefix)} bytes" in str(info.value)


def test_header_length_over_the_bound() -> None:
    with pytest.raises(InvalidWeights, match="exceeds the bound") as info:
        header_length(struct.pack("<Q", MAX_HEADER_BYTES + 1), FILE)
    assert FILE in str(info.value) and str(MAX_HEADER_BYTES + 1) in str(info.value)
    # A length that would overflow a signed 64-bit read is refused the same way.
    with pytest.raises(InvalidWeights, match="exceeds the bound"):
        header_length(b"\xff" * 8, FILE)


def test_header_length_at_the_bound_is_accepted() -> None:
    assert header_length(struct.pack("<Q", MAX_HEADER_BYTES), FILE) == MAX_HEADER_BYTES


@pytest.mark.parametrize("n", [0, 1])
def test_header_length_too_small_for_a_json_object(n: int) -> None:
    with pytest.raises(InvalidWeights, match="too small to hold a JSON object"):
        header_length(struct.pack("<Q", n), FILE)


# ---------------------------------------------------------------- encoding and JSON


def test_header_not_utf8() -> None:
    rejects(b'{"a\xff": 1}', "not valid UTF-8", "at byte 3")


@pytest.mark.parametrize("raw", [b'{"a": ', b"{nope}", b'{"a": {"dtype": "F32",}}'])
def test_header_not_json(raw: bytes) -> None:
    rejects(raw, "header is not JSON")


@pytest.mark.parametrize("raw", [b"[]", b'"text"', b"42", b"null", b" {}"])
def test_header_json_but_not_an_object(raw: bytes) -> None:
    # The format says the header MUST begin with '{': arrays, scalars and leading whitespace are refused.
    rejects(raw, "header is not JSON", "must start with '{'")


def test_empty_header_is_a_model_without_tensors() -> None:
    header = parse_header(b"{}", FILE, 8 + 2)
    assert header == Header(header_len=2, tensors=(), metadata={})
    assert header.data_start == 10 and header.data_len == 0 and header.file_size == 10


def test_trailing_space_padding_is_allowed() -> None:
    raw = encode({"a": spec("F32", [2], 0, 8)}) + b"       "
    header = parse_header(raw, FILE, 8 + len(raw) + 8)
    assert header.header_len == len(raw)
    assert header.data_start == 8 + len(raw)


# ---------------------------------------------------------------- one tensor entry


def test_entry_must_be_an_object() -> None:
    rejects({"w": [1, 2]}, "tensor 'w'", "entry must be an object")


@pytest.mark.parametrize("dtype", ["F128", "float32", "f32", None, 7])
def test_unknown_dtype(dtype: Any) -> None:
    rejects({"w": spec(dtype, [1], 0, 4)}, "tensor 'w'", "unknown dtype")


def test_missing_dtype() -> None:
    rejects({"w": {"shape": [1], "data_offsets": [0, 4]}}, "tensor 'w'", "unknown dtype None")


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}])
def test_unhashable_dtype_is_invalid_model(dtype: Any) -> None:
    rejects({"w": spec(dtype, [1], 0, 4)}, "tensor 'w'", "unknown dtype")


@pytest.mark.parametrize("shape", [None, "2", [-1], [2.0], [True], [1, "2"], {"0": 2}])
def test_bad_shape(shape: Any) -> None:
    rejects({"w": spec("U8", shape, 0, 2)}, "tensor 'w'", "shape must be a list of non-negative integers")


@pytest.mark.parametrize(
    "offsets",
    [
        [8, 4],  # begin > end
        [-4, 0],  # negative
        [0],  # wrong count
        [0, 4, 8],
        [],
        [False, True],  # bools are not integers here
        [0, 4.0],
        "0,4",
        None,
    ],
)
def test_bad_data_offsets(offsets: Any) -> None:
    entry = {"dtype": "F32", "shape": [1], "data_offsets": offsets}
    rejects({"w": entry}, "tensor 'w'", "data_offsets must be [begin, end] with 0 <= begin <= end")


def test_unexpected_fields() -> None:
    rejects({"w": {**spec("F32", [1], 0, 4), "scale": 2}}, "tensor 'w'", "unexpected fields ['scale']")


@pytest.mark.parametrize(
    ("dtype", "shape", "span", "needs"),
    [("F32", [2, 3], 20, 24), ("F16", [3], 8, 6), ("I64", [], 4, 8), ("BOOL", [0], 1, 0)],
)
def test_offsets_span_must_match_dtype_times_shape(dtype: str, shape: list[int], span: int, needs: int) -> None:
    rejects(
        {"w": spec(dtype, shape, 0, span)},
        "tensor 'w'",
        f"data_offsets span {span} bytes but {dtype} {shape} needs {needs}",
    )


@pytest.mark.parametrize(("dtype", "shape"), [("F4", [3]), ("F4", [1, 5]), ("F6_E2M3", [2]), ("F6_E3M2", [3])])
def test_sub_byte_dtypes_must_fill_whole_bytes(dtype: str, shape: list[int]) -> None:
    rejects({"w": spec(dtype, shape, 0, 1)}, "tensor 'w'", "does not fill whole bytes")


@pytest.mark.parametrize(("dtype", "shape", "nbytes"), [("F4", [4], 2), ("F4", [2, 3], 3), ("F6_E2M3", [4], 3)])
def test_sub_byte_dtypes_that_fill_whole_bytes(dtype: str, shape: list[int], nbytes: int) -> None:
    header = parse({"w": spec(dtype, shape, 0, nbytes)}, 8 + len(encode({"w": spec(dtype, shape, 0, nbytes)})) + nbytes)
    assert header.tensors == (TensorInfo("w", dtype, tuple(shape), 0, nbytes),)


def test_zero_size_and_scalar_tensors() -> None:
    entries = {
        "empty": spec("F32", [0], 0, 0),
        "empty2d": spec("F16", [4, 0], 0, 0),
        "scalar": spec("F64", [], 0, 8),
        "after": spec("U8", [3], 8, 11),
        "trailing_empty": spec("I64", [0, 7], 11, 11),
    }
    header = parse(entries, 8 + len(encode(entries)) + 11)
    by_name = {t.name: t for t in header.tensors}
    assert by_name["empty"].nbytes == 0 and by_name["empty2d"].shape == (4, 0)
    assert by_name["scalar"] == TensorInfo("scalar", "F64", (), 0, 8)
    assert by_name["trailing_empty"].begin == 11
    assert header.data_len == 11


# ---------------------------------------------------------------- layout of the data section


def test_tensors_listed_out_of_order_still_validate_and_come_back_by_offset() -> None:
    entries = {"c": spec("F32", [1], 12, 16), "a": spec("F32", [2], 0, 8), "b": spec("I32", [1], 8, 12)}
    header = parse(entries)
    assert [t.name for t in header.tensors] == ["a", "b", "c"]
    assert [(t.begin, t.end) for t in header.tensors] == [(0, 8), (8, 12), (12, 16)]


def test_overlapping_tensors() -> None:
    msg = rejects({"a": spec("F32", [1], 0, 4), "b": spec("F32", [1], 2, 6)}, "offsets overlap", "'a'", "'b'")
    assert "[0, 4)" in msg and "[2, 6)" in msg


def test_two_tensors_on_the_same_bytes_overlap() -> None:
    rejects({"a": spec("F32", [1], 0, 4), "b": spec("I32", [1], 0, 4)}, "offsets overlap")


def test_zero_size_tensor_inside_another_overlaps() -> None:
    rejects({"a": spec("F32", [2], 0, 8), "z": spec("F32", [0], 4, 4)}, "offsets overlap", "'z'")


def test_hole_between_tensors() -> None:
    rejects(
        {"a": spec("F32", [1], 0, 4), "b": spec("F32", [1], 8, 12)},
        "hole of 4 bytes",
        "after 'a'",
        "(before 'b')",
    )


def test_data_must_start_at_zero() -> None:
    rejects({"a": spec("F32", [1], 4, 8)}, "hole of 4 bytes", "at the start of the data", "'a'")


def test_file_shorter_than_header_says() -> None:
    entries = {"a": spec("F32", [4], 0, 16)}
    needed = 8 + len(encode(entries)) + 16
    msg = rejects(entries, "shorter than its header says", file_size=needed - 1)
    assert f"{needed - 1} bytes" in msg and str(needed) in msg


def test_file_longer_than_header_says() -> None:
    entries = {"a": spec("F32", [4], 0, 16)}
    needed = 8 + len(encode(entries)) + 16
    rejects(entries, "3 bytes after the last tensor", "data length does not match", file_size=needed + 3)


def test_file_size_is_optional_and_exact_size_passes() -> None:
    entries = {"a": spec("F32", [4], 0, 16)}
    assert parse(entries).file_size == 8 + len(encode(entries)) + 16
    assert parse(entries, 8 + len(encode(entries)) + 16).data_len == 16


# ---------------------------------------------------------------- __metadata__


def test_metadata_is_kept_and_not_a_tensor() -> None:
    entries = {"__metadata__": {"format": "pt", "note": ""}, "a": spec("U8", [1], 0, 1)}
    header = parse(entries)
    assert header.metadata == {"format": "pt", "note": ""}
    assert [t.name for t in header.tensors] == ["a"]


@pytest.mark.parametrize("metadata", [{"n": 1}, {"n": None}, {"n": {"x": "y"}}, ["a", "b"], "text", None])
def test_metadata_must_map_strings_to_strings(metadata: Any) -> None:
    rejects(
        {"__metadata__": metadata, "a": spec("U8", [1], 0, 1)},
        "__metadata__ must be a JSON object of strings",
    )


# ---------------------------------------------------------------- real files from the safetensors library


def _real_torch_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 2, 2, generator=g).bfloat16(),
        "f64": torch.randn(4, generator=g).double(),
        "i64": torch.arange(-3, 3, dtype=torch.int64),
        "i32": torch.arange(5, dtype=torch.int32),
        "i16": torch.arange(6, dtype=torch.int16).reshape(2, 3),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.arange(11, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }


def _raw_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def test_real_torch_file_matches_safe_open(tmp_path: Path) -> None:
    tensors = _real_torch_tensors()
    data = safetensors.torch.save(tensors, metadata={"format": "pt"})
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)

    header = split(data, "model.safetensors")
    assert header.metadata == {"format": "pt"}
    assert header.file_size == len(data)
    infos = {t.name: t for t in header.tensors}
    with safe_open(str(path), framework="pt") as f:
        assert sorted(infos) == sorted(f.keys())
        assert [t.name for t in header.tensors] == list(f.offset_keys())
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            info, sl = infos[name], f.get_slice(name)
            assert info.dtype == sl.get_dtype()
            assert list(info.shape) == sl.get_shape()
            # The offsets point at exactly the bytes safetensors itself returns for this tensor.
            on_disk = data[header.data_start + info.begin : header.data_start + info.end]
            assert on_disk == _raw_bytes(f.get_tensor(name)) == _raw_bytes(tensors[name])


def test_real_numpy_file_matches_safe_open(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arrays: dict[str, np.ndarray[Any, Any]] = {
        "z": rng.standard_normal((4, 3)).astype(np.float32),
        "a": np.arange(10, dtype=np.uint16),
        "m": np.array(7, dtype=np.uint64),
        "e": np.zeros((2, 0, 3), dtype=np.float64),
    }
    data = safetensors.numpy.save(arrays)
    path = tmp_path / "np.safetensors"
    path.write_bytes(data)

    header = split(data, path.name)
    with safe_open(str(path), framework="np") as f:
        for t in header.tensors:
            assert t.dtype == f.get_slice(t.name).get_dtype()
            begin, end = header.data_start + t.begin, header.data_start + t.end
            assert data[begin:end] == f.get_tensor(t.name).tobytes() == arrays[t.name].tobytes()


def test_real_file_truncated_or_extended_is_refused() -> None:
    data = safetensors.torch.save({"w": torch.ones(4)})
    with pytest.raises(InvalidWeights, match="shorter than its header says"):
        split(data[:-1])
    with pytest.raises(InvalidWeights, match="1 bytes after the last tensor"):
        split(data + b"\0")
