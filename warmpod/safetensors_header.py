"""Safetensors header parsing and validation: bytes in, a `Header` out, or an `InvalidWeights` naming the rule broken.

Part of the store's format (rule 3). Pure functions, no I/O: the loader validates a file's header from its first
bytes before streaming any data; the edge checks the files it compiles with it.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from warmpod.store import InvalidWeights

# The safetensors reference implementation refuses headers over 100 MB; so do we.
MAX_HEADER_BYTES = 100_000_000
PREFIX_BYTES = 8

# Size of one element in bits (sub-byte float formats pack several elements per byte).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets relative to the start of the data section, as in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A validated safetensors header. `data_start` is the absolute file offset of the data section."""

    header_len: int
    tensors: tuple[TensorInfo, ...]  # ordered by offset
    metadata: dict[str, str]

    @property
    def data_start(self) -> int:
        return PREFIX_BYTES + self.header_len

    @property
    def data_len(self) -> int:
        return self.tensors[-1].end if self.tensors else 0

    @property
    def file_size(self) -> int:
        return self.data_start + self.data_len


def header_length(prefix: bytes, file: str) -> int:
    """The header length stored in a file's first 8 bytes (little-endian u64), checked against the bound."""
    if len(prefix) < PREFIX_BYTES:
        raise InvalidWeights(f"{file}: file is {len(prefix)} bytes, shorter than the 8-byte safetensors prefix")
    (n,) = struct.unpack("<Q", prefix[:PREFIX_BYTES])
    if n > MAX_HEADER_BYTES:
        raise InvalidWeights(f"{file}: header length {n} exceeds the bound of {MAX_HEADER_BYTES} bytes")
    if n < 2:
        raise InvalidWeights(f"{file}: header length {n} is too small to hold a JSON object")
    return int(n)


def parse_header(header_bytes: bytes, file: str, file_size: int | None = None) -> Header:
    """Validate a header (the N bytes after the prefix) against every safetensors rule.

    With `file_size`, also check the data section's length matches the file exactly.
    """
    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidWeights(f"{file}: header is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.startswith("{"):
        raise InvalidWeights(f"{file}: header is not JSON: it must start with '{{'")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidWeights(f"{file}: header is not JSON: {e.msg} at position {e.pos}") from None

    metadata = _metadata(raw.pop("__metadata__", {}), file)
    tensors = sorted((_tensor(name, spec, file) for name, spec in raw.items()), key=lambda t: (t.begin, t.end))
    _check_layout(tensors, file)
    header = Header(header_len=len(header_bytes), tensors=tuple(tensors), metadata=metadata)
    if file_size is not None and file_size != header.file_size:
        if file_size < header.file_size:
            raise InvalidWeights(
                f"{file}: file is shorter than its header says: {file_size} bytes, header needs {header.file_size}"
            )
        raise InvalidWeights(
            f"{file}: file has {file_size - header.file_size} bytes after the last tensor "
            f"(header says {header.file_size} bytes): data length does not match"
        )
    return header


def _metadata(value: Any, file: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise InvalidWeights(f"{file}: __metadata__ must be a JSON object of strings to strings")
    return dict(value)


def _tensor(name: str, spec: Any, file: str) -> TensorInfo:
    if not isinstance(spec, dict):
        raise InvalidWeights(f"{file}: tensor {name!r}: entry must be an object with dtype, shape, data_offsets")
    dtype = spec.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise InvalidWeights(f"{file}: tensor {name!r}: unknown dtype {dtype!r}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidWeights(f"{file}: tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    offsets = spec.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise InvalidWeights(f"{file}: tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end")
    extra = set(spec) - {"dtype", "shape", "data_offsets"}
    if extra:
        raise InvalidWeights(f"{file}: tensor {name!r}: unexpected fields {sorted(extra)}")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8:
        raise InvalidWeights(f"{file}: tensor {name!r}: {dtype} shape {shape} does not fill whole bytes")
    begin, end = offsets
    if end - begin != bits // 8:
        raise InvalidWeights(
            f"{file}: tensor {name!r}: data_offsets span {end - begin} bytes but {dtype} {shape} needs {bits // 8}"
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_layout(tensors: list[TensorInfo], file: str) -> None:
    """Tensors must tile the data section exactly: start at 0, no overlaps, no holes."""
    cursor = 0
    previous: TensorInfo | None = None
    for t in tensors:
        if t.begin < cursor and previous is not None:
            raise InvalidWeights(
                f"{file}: offsets overlap: {previous.name!r} [{previous.begin}, {previous.end}) "
                f"and {t.name!r} [{t.begin}, {t.end})"
            )
        if t.begin > cursor:
            where = f"after {previous.name!r}" if previous else "at the start of the data"
            raise InvalidWeights(
                f"{file}: offsets leave a hole of {t.begin - cursor} bytes {where} (before {t.name!r})"
            )
        cursor = t.end
        previous = t
