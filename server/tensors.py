"""Tensors as the protocol sees them: V2 datatypes, named shaped arrays, and the specs a model declares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# V2 datatype → numpy dtype (little-endian, as the binary extension sends them). BYTES is an object array of bytes.
# BF16 has no numpy dtype: a model that wants it is served through another datatype.
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
DATATYPES = tuple(NUMPY_DTYPES)


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype of a numpy array (object arrays are BYTES)."""
    if array.dtype == object:
        return "BYTES"
    for name, dtype in NUMPY_DTYPES.items():
        if name != "BYTES" and array.dtype.newbyteorder("<") == dtype:
            return name
    raise TypeError(f"numpy dtype {array.dtype} has no V2 datatype")


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, V2 datatype, shape with -1 for any size (the first dimension is the batch)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def matches(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.shape) and all(
            want in (-1, got) for want, got in zip(self.shape, shape, strict=True)
        )


@dataclass
class Tensor:
    """A decoded request input or a model output: `data` already has `shape` (BYTES: an object array of bytes)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
