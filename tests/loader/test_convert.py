"""The converted layout of `warmpod load --dtype`, planned from a header alone (no disk, no torch), the loader's own
bf16 rounding (numpy) checked bit for bit against torch's, and the identity digest that keeps a converted staging
apart from an as-is one."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch

from tests.kit.models import raw_safetensors
from warmpod.errors import UsageError
from warmpod.loader.convert import FP16_REFUSED, bf16_bits, plan_conversion, target_dtype
from warmpod.loader.sources import SourceFile, identity_digest
from warmpod.safetensors_header import DTYPE_BITS, PREFIX_BYTES, Header, header_length, parse_header


def header_of(spec: dict[str, tuple[str, list[int]]], metadata: dict[str, str] | None = None) -> Header:
    """A valid header for tensors {name: (dtype, shape)} laid out in the given order (no alignment padding)."""
    entries: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    cursor = 0
    for name, (dtype, shape) in spec.items():
        size = DTYPE_BITS[dtype] * math.prod(shape) // 8
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [cursor, cursor + size]}
        cursor += size
    blob = raw_safetensors(entries)
    n = header_length(blob, "m.safetensors")
    return parse_header(blob[PREFIX_BYTES : PREFIX_BYTES + n], "m.safetensors", len(blob) + cursor)


MIXED = {
    "scalar": ("F32", []),
    "half": ("F16", [3, 5]),
    "ids": ("I64", [7]),
    "w": ("F32", [5, 3]),
    "mask": ("BOOL", [9]),
    "double": ("F64", [2]),
    "already": ("BF16", [3]),
    "quant": ("F8_E4M3", [5]),
}


def test_floats_become_bf16_and_the_rest_is_kept_with_its_bytes() -> None:
    layout = plan_conversion(header_of(MIXED, {"format": "pt"}), "BF16", "m.safetensors")
    assert layout.converted == {"F32": 2, "F16": 1, "F64": 1}
    assert layout.kept == {"I64": 1, "BOOL": 1, "BF16": 1, "F8_E4M3": 1}
    dtypes = {t.name: t.dtype for t in layout.header.tensors}
    assert dtypes == {
        "scalar": "BF16",
        "half": "BF16",
        "ids": "I64",
        "w": "BF16",
        "mask": "BOOL",
        "double": "BF16",
        "already": "BF16",
        "quant": "F8_E4M3",
    }
    assert layout.header.metadata == {"format": "pt"}
    for move in layout.moves:
        src_bytes, dest_bytes = move.src_end - move.src_begin, move.dest_end - move.dest_begin
        assert dest_bytes == (src_bytes * 16 // DTYPE_BITS[move.src_dtype] if move.converted else src_bytes)
    assert {m.name for m in layout.moves if m.converted} == {"scalar", "half", "w", "double"}


def test_the_converted_file_is_valid_safetensors_aligned_and_contiguous() -> None:
    layout = plan_conversion(header_of(MIXED), "BF16", "m.safetensors")
    (n,) = struct.unpack("<Q", layout.prefix[:PREFIX_BYTES])
    assert len(layout.prefix) == PREFIX_BYTES + n and len(layout.prefix) % 8 == 0  # the data starts 8-byte aligned
    reparsed = parse_header(layout.prefix[PREFIX_BYTES:], "m.safetensors", layout.file_size)  # every rule holds
    assert reparsed == layout.header
    assert json.loads(layout.prefix[PREFIX_BYTES:])  # plain JSON (space padding is JSON whitespace)
    cursor = layout.header.data_start
    for move in layout.moves:  # the file's order: contiguous, no hole, each tensor aligned to its element size
        assert move.dest_begin == cursor
        bits = 16 if move.converted else DTYPE_BITS[move.src_dtype]
        assert move.dest_begin % max(1, bits // 8) == 0
        cursor = move.dest_end
    assert cursor == layout.file_size
    # Largest elements first: the I64 tensor leads, the 1-byte ones close.
    assert layout.moves[0].name == "ids" and {m.name for m in layout.moves[-2:]} == {"mask", "quant"}


def test_nothing_to_convert_is_the_identity() -> None:
    header = header_of({"ids": ("I64", [4]), "b": ("BF16", [2]), "mask": ("BOOL", [3])})
    layout = plan_conversion(header, "BF16", "m.safetensors")
    assert layout.identity and layout.header is header and layout.moves == () and layout.prefix == b""
    assert layout.converted == {} and layout.kept == {"I64": 1, "BF16": 1, "BOOL": 1}
    assert layout.record(123, None) == {
        "source_size": 123,
        "source_sha256": None,
        "converted": {},
        "kept": {"BF16": 1, "BOOL": 1, "I64": 1},
    }


def test_empty_tensors_and_an_empty_file() -> None:
    layout = plan_conversion(header_of({"empty": ("F32", [0, 4]), "x": ("F32", [2])}), "BF16", "m.safetensors")
    assert [(m.name, m.dest_end - m.dest_begin) for m in layout.moves] == [("empty", 0), ("x", 4)]
    assert plan_conversion(header_of({}), "BF16", "m.safetensors").identity


def test_dtype_choices() -> None:
    assert target_dtype("bf16") == "BF16"
    with pytest.raises(UsageError, match="slower than fp32") as refused:
        target_dtype("fp16")
    assert str(refused.value) == FP16_REFUSED and "use --dtype bf16" in FP16_REFUSED
    with pytest.raises(UsageError, match="choose bf16"):
        target_dtype("int8")
    with pytest.raises(UsageError, match="converts to BF16"):
        plan_conversion(header_of({}), "F8_E4M3", "m.safetensors")


def test_the_identity_digest_includes_the_dtype() -> None:
    files = [SourceFile("model.safetensors", "/m/model.safetensors", 10, {"size": "10", "mtime": "1"})]
    as_is, bf16 = identity_digest(files), identity_digest(files, "BF16")
    assert as_is != bf16 and identity_digest(files, None) == as_is and identity_digest(list(files), "BF16") == bf16


def torch_bf16_bits(values: np.ndarray) -> np.ndarray:
    return torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def test_the_loaders_bf16_rounding_is_torchs_bit_for_bit() -> None:
    rng = np.random.default_rng(16)
    every_exponent = rng.standard_normal(1 << 18) * 10.0 ** rng.integers(-45, 39, 1 << 18)
    with np.errstate(over="ignore"):
        spread = every_exponent.astype(np.float32)
    # A stride through all 2**32 bit patterns: subnormals, ties, the largest finite values, infinities, NaNs.
    patterns = np.arange(0, 1 << 32, 4093, dtype=np.uint64).astype(np.uint32).view(np.float32)
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x7F7F8000, 0x00008000], dtype=np.uint32).view(np.float32)
    for values in (spread, patterns, ties):
        assert np.array_equal(bf16_bits(values), torch_bf16_bits(values))
    assert bf16_bits(ties).tolist() == [0x3F80, 0x3F82, 0xBF80, 0x7F80, 0x0000]  # to even; the top rounds to inf


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_f16_and_f64_round_as_torch_does(dtype: type) -> None:
    rng = np.random.default_rng(17)
    with np.errstate(over="ignore"):
        values = (rng.standard_normal(1 << 16) * 10.0 ** rng.integers(-8, 8, 1 << 16)).astype(dtype)
    assert np.array_equal(bf16_bits(values), torch_bf16_bits(values))
