"""Dtype conversion while staging (`warmpod load --dtype bf16`): the converted file's layout, planned from the source's
header alone (pure), and the copy that writes it from the staged source with numpy (the shell, `write_converted`).

What converts: every floating-point tensor of 16 bits or more (F64, F32, F16) becomes the target dtype; integer and
bool tensors, 8-bit and smaller float formats (quantized weights: converting would grow them) and tensors already in
the target dtype are copied as they are. No family keeps a tensor in fp32: measured on all-MiniLM-L6-v2 over 200
sentences, an all-bf16 model gave a min cosine of 0.999907 to fp32 and ran 1.94x faster; keeping LayerNorm in fp32
gave the same min cosine at only 1.75x, and keeping the embeddings in fp32 breaks the forward (dtype mismatch).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import mmap
import os
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from warmpod.errors import UsageError
from warmpod.loader.errors import IntegrityError
from warmpod.safetensors_header import DTYPE_BITS, PREFIX_BYTES, Header, header_length, parse_header

# `--dtype` choice → the safetensors dtype staged.
TARGETS = {"bf16": "BF16"}
CHOICES = ("bf16", "fp16")  # fp16 is a choice argparse accepts, so that its refusal can say why
# Measured on this project's CPU path (torch 2.13 CPU, AVX512 with avx512_bf16, no AVX512-FP16 or AMX), all-MiniLM-L6-v2
# forward on 1 thread, 24 tokens: fp32 15.0 ms, bf16 7.5 ms, fp16 31.3 ms at batch 1; 223, 102, 936 ms at batch 32.
FP16_REFUSED = (
    "--dtype fp16: this CPU path runs fp16 slower than fp32 (all-MiniLM-L6-v2 on 1 thread: 31.3 ms vs 15.0 ms at "
    "batch 1, 936 ms vs 223 ms at batch 32; torch has no fast fp16 kernels without AVX512-FP16/AMX); use --dtype bf16 "
    "(half the memory, 2x faster than fp32)"
)
CONVERTED_FROM = frozenset({"F64", "F32", "F16"})
_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2")}
CHUNK_ELEMENTS = 4 << 20  # converted per step: bounds the loader's own memory (~40 MiB of temporaries)


def target_dtype(choice: str) -> str:
    """The safetensors dtype a `--dtype` choice stages; UsageError saying why for a refused or unknown one."""
    if choice == "fp16":
        raise UsageError(FP16_REFUSED)
    target = TARGETS.get(choice)
    if target is None:
        raise UsageError(
            f"--dtype {choice!r}: choose bf16 (or leave it out to stage the tensors as the source has them)"
        )
    return target


def check_converter() -> None:
    """Conversion runs on numpy (the loader extra has it): say so before anything is fetched if it is missing."""
    if importlib.util.find_spec("numpy") is None:
        raise UsageError("--dtype converts with numpy, which is not installed here: install warmpod[loader]")


@dataclass(frozen=True)
class TensorMove:
    """One tensor's bytes: [src_begin, src_end) of the source file to [dest_begin, dest_end) of the converted one
    (absolute offsets), converted from `src_dtype` or copied as they are."""

    name: str
    src_dtype: str
    src_begin: int
    src_end: int
    dest_begin: int
    dest_end: int
    converted: bool

    @property
    def elements(self) -> int:
        return (self.src_end - self.src_begin) * 8 // DTYPE_BITS[self.src_dtype]


@dataclass(frozen=True)
class ConvertedLayout:
    """The converted file of one safetensors source file: its prefix (length + header JSON, padded to 8 bytes), its
    validated header, where each tensor's bytes go, and what was converted. `header` is the source's own when nothing
    converts (`identity`: the staged file is the source's bytes)."""

    file: str
    target: str
    prefix: bytes  # empty when nothing converts
    header: Header
    moves: tuple[TensorMove, ...]  # in the converted file's order
    converted: dict[str, int]  # source dtype → tensors converted from it
    kept: dict[str, int]  # dtype → tensors copied as they are

    @property
    def identity(self) -> bool:
        return not self.converted

    @property
    def file_size(self) -> int:
        return self.header.file_size

    def record(self, source_size: int, source_sha256: str | None) -> dict[str, Any]:
        """This file's entry in the manifest's "conversion" record."""
        return {
            "source_size": source_size,
            "source_sha256": source_sha256,
            "converted": dict(sorted(self.converted.items())),
            "kept": dict(sorted(self.kept.items())),
        }


def plan_conversion(header: Header, target: str, file: str) -> ConvertedLayout:
    """The layout of `file` (whose validated header is `header`) with its floating-point tensors in `target`. Pure.

    Tensors are laid out by element size, largest first, then in source order, so that every tensor starts at a
    multiple of its element size (the data section starts 8-byte aligned); metadata is kept as it is."""
    if target not in TARGETS.values():
        raise UsageError(f"cannot convert to {target}: the loader converts to {', '.join(sorted(TARGETS.values()))}")
    out_dtype = {
        t.name: (target if t.dtype in CONVERTED_FROM and t.dtype != target else t.dtype) for t in header.tensors
    }
    converted = Counter(t.dtype for t in header.tensors if out_dtype[t.name] != t.dtype)
    kept = Counter(t.dtype for t in header.tensors if out_dtype[t.name] == t.dtype)
    if not converted:
        return ConvertedLayout(file, target, b"", header, (), {}, dict(kept))

    order = sorted(header.tensors, key=lambda t: -DTYPE_BITS[out_dtype[t.name]])  # stable: source order within a size
    entries: dict[str, Any] = {"__metadata__": header.metadata} if header.metadata else {}
    spans: list[tuple[int, int]] = []
    cursor = 0
    for t in order:
        size = math.prod(t.shape) * DTYPE_BITS[out_dtype[t.name]] // 8
        entries[t.name] = {"dtype": out_dtype[t.name], "shape": list(t.shape), "data_offsets": [cursor, cursor + size]}
        spans.append((cursor, cursor + size))
        cursor += size
    blob = json.dumps(entries, separators=(",", ":")).encode()
    blob += b" " * (-(PREFIX_BYTES + len(blob)) % 8)  # the data section starts 8-byte aligned, as safetensors writes
    new_header = parse_header(blob, file, PREFIX_BYTES + len(blob) + cursor)  # the rules checked on our own output
    start = PREFIX_BYTES + len(blob)
    moves = tuple(
        TensorMove(
            t.name,
            t.dtype,
            header.data_start + t.begin,
            header.data_start + t.end,
            start + begin,
            start + end,
            out_dtype[t.name] != t.dtype,
        )
        for t, (begin, end) in zip(order, spans, strict=True)
    )
    return ConvertedLayout(
        file, target, struct.pack("<Q", len(blob)) + blob, new_header, moves, dict(converted), dict(kept)
    )


# ---------------------------------------------------------------- the rounding (pure) and the shell


def bf16_bits(values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of `values` (taken as float32), rounded to nearest, ties to even — what torch's
    `.to(torch.bfloat16)` gives, bit for bit: the upper 16 bits of each float32 after adding 0x7FFF plus the lowest
    kept bit; a NaN becomes the NaN torch writes (0xFFFF) instead of rounding into infinity. Into `out` when given
    (a reused buffer of the same length); `values` is never written. In place where it can: one temporary."""
    values = values.astype(np.float32, copy=False)
    bits = values.view(np.uint32)
    rounded = np.right_shift(bits, 16)
    np.bitwise_and(rounded, 1, out=rounded)
    rounded += 0x7FFF
    rounded += bits
    rounded >>= 16
    if out is None:
        out = np.empty(len(values), dtype=np.uint16)
    np.copyto(out, rounded, casting="unsafe")
    nan = np.isnan(values)
    if nan.any():
        out[nan] = 0xFFFF  # the one NaN torch's CPU conversion writes, whatever the sign or payload
    return out


def write_converted(source: Path, dest: Path, layout: ConvertedLayout, want_sha256: bool) -> str | None:
    """Write `layout`'s file at `dest` from the staged `source` (memory-mapped, read in place): the converted
    tensors through bounded chunks (`bf16_bits`), the rest copied straight from the mapping. numpy only, so the
    loader's own image converts. Written with pwrite, so a full store is an error (ENOSPC), never a SIGBUS. Returns
    the converted file's sha256 when asked for, else None; the header is read back and checked before returning."""
    hasher = hashlib.sha256() if want_sha256 else None
    with open(source, "rb") as f:
        src = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else None
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write(fd, layout.prefix, 0, hasher)
        for move in layout.moves:
            assert src is not None  # a file with tensors to convert has bytes
            if not move.converted:
                _write(fd, memoryview(src)[move.src_begin : move.src_end], move.dest_begin, hasher)
                continue
            in_dtype = _NUMPY_DTYPES[move.src_dtype]
            buffer = np.empty(min(CHUNK_ELEMENTS, move.elements), dtype=np.uint16)
            done = 0
            while done < move.elements:
                n = min(CHUNK_ELEMENTS, move.elements - done)
                part = np.frombuffer(src, dtype=in_dtype, count=n, offset=move.src_begin + done * in_dtype.itemsize)
                # F16 widens exactly; F64 narrows to F32 first, as torch's conversion does (BFloat16 has no double
                # constructor), so the result is the same bits as torch's.
                out = bf16_bits(part, buffer[:n])
                del part  # a view of the mapping: it must be gone before the mapping closes
                _write(fd, out.data, move.dest_begin + done * 2, hasher)
                done += n
    finally:
        os.close(fd)
        if src is not None:
            src.close()
    check_converted(dest, layout)
    return hasher.hexdigest() if hasher else None


def _write(fd: int, data: memoryview | bytes, offset: int, hasher: Any) -> None:
    view = memoryview(data).cast("B")
    if hasher is not None:
        hasher.update(view)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def check_converted(path: Path, layout: ConvertedLayout) -> None:
    """The converted file must parse back (every safetensors rule) to the planned header, at the planned size."""
    with open(path, "rb") as f:
        n = header_length(f.read(PREFIX_BYTES), layout.file)
        size = os.fstat(f.fileno()).st_size
        header = parse_header(f.read(n), layout.file, size)
    if header != layout.header:
        raise IntegrityError(f"{layout.file}: the converted file's header is not the planned one: a loader bug")
