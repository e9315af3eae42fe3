"""Open Inference Protocol v2 (KServe/Triton REST) codec: request body → tensors, output tensors → response body.

JSON tensor data and Triton's binary tensor data extension (raw tensors after a JSON header), and the bodies of
Triton's model configuration, statistics and repository index extensions. No HTTP, no model.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from warmpod.server.errors import BadRequest
from warmpod.server.metrics import Duration, ModelTotals
from warmpod.server.tensors import DATATYPES, NUMPY_DTYPES, Tensor, TensorSpec

HEADER_LENGTH_HEADER = "Inference-Header-Content-Length"

# The Python types json.loads gives for the values each datatype accepts (exact types: bool is not an int here).
_JSON_TYPES: dict[str, frozenset[type]] = {
    "BOOL": frozenset({bool}),
    "FP16": frozenset({int, float}),
    "FP32": frozenset({int, float}),
    "FP64": frozenset({int, float}),
    "BYTES": frozenset({str}),
} | {name: frozenset({int}) for name in DATATYPES if name.startswith(("INT", "UINT"))}
_KIND = {"BOOL": "true or false", "BYTES": "strings"} | {
    name: "numbers" if name.startswith("FP") else "integers" for name in DATATYPES if name not in ("BOOL", "BYTES")
}
_FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64"})
_U32 = struct.Struct("<I")
_DIGITS = re.compile(r"[0-9]+")
_MISSING: Any = object()  # tells an absent key from an explicit null


@dataclass
class RequestedOutput:
    """One entry of the request's `outputs`; `binary` None means "as the request's binary_data_output says"."""

    name: str
    binary: bool | None


@dataclass
class InferRequest:
    """A decoded inference request. `outputs` None asks for every output of the model."""

    id: str | None
    inputs: dict[str, Tensor]
    outputs: list[RequestedOutput] | None
    binary_default: bool  # parameters.binary_data_output
    parameters: dict[str, Any]


@dataclass
class _InputHeader:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any  # the JSON `data`, or None when the tensor is binary
    binary_size: int | None


def parse_header_length(value: str | None) -> int | None:
    """The `Inference-Header-Content-Length` header as an int (None when absent)."""
    if value is None:
        return None
    text = value.strip()
    if not _DIGITS.fullmatch(text):
        raise BadRequest(
            f"{HEADER_LENGTH_HEADER} must be a non-negative integer (the length in bytes of the JSON header "
            f"that precedes the binary tensor data), got {value!r}"
        )
    return int(text)


def parse_infer_request(body: bytes, header_length: int | None) -> InferRequest:
    """Decode and validate a V2 inference request; `header_length` is None when the whole body is JSON."""
    json_end = len(body) if header_length is None else _check_header_length(header_length, len(body))
    try:
        header = load_json(body[:json_end])
    except BadRequest:
        if header_length is None and _bytes_after_json(body):
            raise BadRequest(
                "the body has bytes after its JSON: binary tensor data needs the Inference-Header-Content-Length "
                "header (the length of the JSON part)"
            ) from None
        raise
    if not isinstance(header, dict):
        raise BadRequest(f"the request body must be a JSON object with an 'inputs' list, got {_type_name(header)}")

    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(f"'id' must be a string, got {_type_name(request_id)}")
    parameters = _parameters(header.get("parameters"), "request")
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise BadRequest(f"parameters.binary_data_output must be true or false, got {_short(binary_default)}")

    headers = _input_headers(header.get("inputs", _MISSING))
    sections = _binary_sections(headers, memoryview(body)[json_end:], header_length is not None)
    inputs = {h.name: Tensor(h.name, h.datatype, h.shape, _decode(h, sections.get(h.name))) for h in headers}
    return InferRequest(request_id, inputs, _requested_outputs(header.get("outputs")), binary_default, parameters)


def select_outputs(request: InferRequest, available: Sequence[str]) -> list[tuple[str, bool]]:
    """(name, binary) for each output to send: the requested ones in request order, else all of `available`."""
    if request.outputs is None:
        return [(name, request.binary_default) for name in available]
    selected = []
    for output in request.outputs:
        if output.name not in available:
            raise BadRequest(f"unknown output '{output.name}'; this model's outputs are: {', '.join(available)}")
        selected.append((output.name, request.binary_default if output.binary is None else output.binary))
    return selected


def encode_infer_response(
    model_name: str, model_version: str, request_id: str | None, outputs: Sequence[tuple[Tensor, bool]]
) -> tuple[bytes, int | None]:
    """The response body and its JSON header length (None when no output is binary, so the body is all JSON).

    Raises ValueError for what JSON cannot carry: NaN/Inf in a floating-point output or non-UTF-8 BYTES; such outputs
    must be requested with `binary_data: true`.
    """
    entries = []
    blobs = []
    for tensor, binary in outputs:
        data = _output_array(tensor)
        head = f'{{"name":{_dumps(tensor.name)},"datatype":{_dumps(tensor.datatype)},"shape":{_dumps(data.shape)}'
        if binary:
            blob = _binary_bytes(tensor.name, tensor.datatype, data)
            blobs.append(blob)
            entries.append(f'{head},"parameters":{{"binary_data_size":{len(blob)}}}}}')
        else:
            entries.append(f'{head},"data":{_json_data(tensor.name, tensor.datatype, data)}}}')
    request_id_field = "" if request_id is None else f'"id":{_dumps(request_id)},'
    header = (
        f'{{"model_name":{_dumps(model_name)},"model_version":{_dumps(model_version)},{request_id_field}'
        f'"outputs":[{",".join(entries)}]}}'
    ).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def error_body(message: str) -> bytes:
    """The V2 error response body."""
    return _dumps({"error": message}).encode()


# --- Triton's extensions: model configuration, statistics, repository index -----------------------------------------

# V2 datatype → Triton's model configuration data type (BYTES is TYPE_STRING there).
TRITON_TYPES = {name: "TYPE_STRING" if name == "BYTES" else f"TYPE_{name}" for name in DATATYPES}


@dataclass(frozen=True)
class Scheduling:
    """How the server batches and queues (its flags), as the model configuration reports them."""

    max_batch_size: int  # --max-batch-size
    max_queue_delay_us: int  # --max-batch-delay-ms
    max_queue_size: int  # --max-queue
    timeout_us: int  # --request-timeout: the whole request's deadline (a request's parameters.timeout may shorten it)
    instances: int  # --workers: forward passes at once


def model_config(
    name: str, platform: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], scheduling: Scheduling
) -> dict[str, Any]:
    """GET /v2/models/{m}/config: the model in Triton's JSON model configuration (its ModelConfig protobuf as JSON,
    int64 fields as numbers, as Triton prints them).

    With max_batch_size > 0, `dims` leave out the batch dimension, as Triton's do: the metadata's shape is always
    [-1] + dims. The batcher is Triton's dynamic batcher with a queue policy: a delay, a bounded queue that rejects
    when full, a timeout that a request may shorten.
    """
    batching = scheduling.max_batch_size > 0

    def dims(spec: TensorSpec) -> list[int]:
        return list(spec.shape[1:] if batching and spec.shape else spec.shape)

    return {
        "name": name,
        "platform": platform,
        "backend": "warmpod",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": scheduling.max_batch_size,
        "input": [
            {
                "name": s.name,
                "data_type": TRITON_TYPES[s.datatype],
                "format": "FORMAT_NONE",
                "dims": dims(s),
                "is_shape_tensor": False,
                "allow_ragged_batch": False,
                "optional": False,
            }
            for s in inputs
        ],
        "output": [
            {
                "name": s.name,
                "data_type": TRITON_TYPES[s.datatype],
                "dims": dims(s),
                "label_filename": "",
                "is_shape_tensor": False,
            }
            for s in outputs
        ],
        "batch_input": [],
        "batch_output": [],
        "dynamic_batching": {
            "preferred_batch_size": [],
            "max_queue_delay_microseconds": scheduling.max_queue_delay_us,
            "preserve_ordering": False,
            "priority_levels": 0,
            "default_priority_level": 0,
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": scheduling.timeout_us,
                "allow_timeout_override": True,
                "max_queue_size": scheduling.max_queue_size,
            },
            "priority_queue_policy": {},
        },
        "instance_group": [
            {
                "name": name,
                "kind": "KIND_CPU",
                "count": scheduling.instances,
                "gpus": [],
                "secondary_devices": [],
                "profile": [],
                "passive": False,
                "host_policy": "",
            }
        ],
        "default_model_filename": "",
        "parameters": {},
        "model_warmup": [],
        "model_transaction_policy": {"decoupled": False},
    }


def model_statistics(name: str, version: str, totals: ModelTotals) -> dict[str, Any]:
    """One entry of GET /v2/models[/{m}[/versions/{v}]]/stats (`model_stats`), from the counters /metrics shows.

    success/fail: requests and their latency; queue: time in the batch queue, per request; compute_infer: forward
    passes and their time (count = executions: one pass serves every request in its batch); compute_input and
    compute_output are not timed apart from the request (0); batch_stats: forward passes by batch size (rows).
    """
    none = _duration(Duration(0, 0.0))
    return {
        "name": name,
        "version": version,
        "last_inference": round(totals.last_inference_s * 1000),
        "inference_count": totals.rows,
        "execution_count": totals.compute.count,
        "inference_stats": {
            "success": _duration(totals.success),
            "fail": _duration(totals.fail),
            "queue": _duration(totals.queue),
            "compute_input": none,
            "compute_infer": _duration(totals.compute),
            "compute_output": none,
            "cache_hit": none,
            "cache_miss": none,
        },
        "response_stats": {},
        "batch_stats": [
            {"batch_size": size, "compute_input": none, "compute_infer": _duration(d), "compute_output": none}
            for size, d in totals.batches.items()
        ],
        "memory_usage": [],
    }


def _duration(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": round(d.seconds * 1e9)}


def parse_repository_index_request(body: bytes) -> bool:
    """POST /v2/repository/index: an empty body, or `{"ready": true|false}`; returns whether to list only the
    models ready for inference."""
    if not body.strip():
        return False
    request = load_json(body)
    if not isinstance(request, dict):
        raise BadRequest(
            f'the request body must be empty or a JSON object like {{"ready": true}}, got {_type_name(request)}'
        )
    ready = request.get("ready", False)
    if not isinstance(ready, bool):
        raise BadRequest(f"'ready' must be true or false, got {_short(ready)}")
    return ready


def repository_entry(name: str, version: str | None, state: str, reason: str = "") -> dict[str, str]:
    """One model of the repository index: state is Triton's READY, LOADING, UNLOADING or UNAVAILABLE."""
    entry = {"name": name} | ({"version": version} if version is not None else {})
    return entry | {"state": state, "reason": reason}


# --- request: JSON header -------------------------------------------------------------------------------------------


def _check_header_length(header_length: int, body_length: int) -> int:
    if header_length < 0:
        raise BadRequest(f"{HEADER_LENGTH_HEADER} must not be negative, got {header_length}")
    if header_length > body_length:
        raise BadRequest(f"{HEADER_LENGTH_HEADER} is {header_length} but the body has only {body_length} bytes")
    return header_length


def _reject_constant(name: str) -> Any:
    raise BadRequest(f"malformed JSON in the request: {name} is not valid JSON (send NaN/Infinity as binary data)")


def _bytes_after_json(body: bytes) -> bool:
    """True when a JSON value is followed by more than whitespace (binary data sent without its header length)."""
    text = body.decode("utf-8", errors="replace")
    try:
        _, end = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return False
    return end < len(text.rstrip())


def load_json(text: bytes) -> Any:
    """Strict JSON (no NaN/Infinity) from a request body; BadRequest saying where it is malformed."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise BadRequest(
            f"malformed JSON in the request: {e.msg} at line {e.lineno} column {e.colno} (char {e.pos})"
        ) from None
    except UnicodeDecodeError as e:
        raise BadRequest(f"the request JSON is not valid UTF-8: {e.reason} at byte {e.start}") from None


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{where}: 'parameters' must be an object, got {_type_name(value)}")
    return value


def _input_headers(raw_inputs: Any) -> list[_InputHeader]:
    if raw_inputs is _MISSING:
        raise BadRequest("the request has no 'inputs': send a list of input tensors")
    if not isinstance(raw_inputs, list):
        raise BadRequest(f"'inputs' must be a list of input tensors, got {_type_name(raw_inputs)}")
    if not raw_inputs:
        raise BadRequest("'inputs' is empty: send at least one input tensor")
    headers: list[_InputHeader] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_inputs):
        header = _input_header(index, raw)
        if header.name in seen:
            raise BadRequest(f"input '{header.name}' appears more than once in 'inputs'")
        seen.add(header.name)
        headers.append(header)
    return headers


def _input_header(index: int, raw: Any) -> _InputHeader:
    if not isinstance(raw, dict):
        raise BadRequest(f"inputs[{index}] must be an object, got {_type_name(raw)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"inputs[{index}] needs a 'name' (a non-empty string)")
    where = f"input '{name}'"
    datatype = raw.get("datatype", _MISSING)
    if datatype is _MISSING:
        raise BadRequest(f"{where}: missing 'datatype'")
    if datatype == "BF16":
        raise BadRequest(f"{where}: datatype BF16 is not supported; send FP32 or FP16")
    if not isinstance(datatype, str) or datatype not in NUMPY_DTYPES:
        raise BadRequest(f"{where}: unknown datatype {_short(datatype)}; supported: {', '.join(DATATYPES)}")
    shape = raw.get("shape", _MISSING)
    if shape is _MISSING:
        raise BadRequest(f"{where}: missing 'shape'")
    if not isinstance(shape, list) or not all(type(dim) is int and dim >= 0 for dim in shape):
        raise BadRequest(f"{where}: 'shape' must be a list of non-negative integers, got {_short(shape)}")

    parameters = _parameters(raw.get("parameters"), where)
    data = raw.get("data")
    binary_size = parameters.get("binary_data_size")
    if data is not None and binary_size is not None:
        raise BadRequest(f"{where}: both 'data' and parameters.binary_data_size are given; send one of them")
    if data is None and binary_size is None:
        if "shared_memory_region" in parameters:
            raise BadRequest(f"{where}: shared memory is not supported; send 'data' or binary data")
        raise BadRequest(f"{where}: no tensor data; send 'data' or binary data sized by parameters.binary_data_size")
    if binary_size is not None and (type(binary_size) is not int or binary_size < 0):
        raise BadRequest(
            f"{where}: parameters.binary_data_size must be a non-negative integer, got {_short(binary_size)}"
        )

    header = _InputHeader(name, datatype, tuple(shape), data, binary_size)
    if binary_size is not None and datatype != "BYTES":
        count = math.prod(header.shape)
        expected = count * NUMPY_DTYPES[datatype].itemsize
        if binary_size != expected:
            raise BadRequest(
                f"{where}: binary_data_size is {binary_size} bytes but shape {shape} of {datatype} "
                f"takes {count} * {NUMPY_DTYPES[datatype].itemsize} = {expected} bytes"
            )
    return header


def _requested_outputs(raw_outputs: Any) -> list[RequestedOutput] | None:
    if raw_outputs is None:
        return None
    if not isinstance(raw_outputs, list):
        raise BadRequest(f"'outputs' must be a list of requested outputs, got {_type_name(raw_outputs)}")
    outputs: list[RequestedOutput] = []
    for index, raw in enumerate(raw_outputs):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"]:
            raise BadRequest(f"outputs[{index}] must be an object with a 'name' (a non-empty string)")
        where = f"output '{raw['name']}'"
        if any(output.name == raw["name"] for output in outputs):
            raise BadRequest(f"{where} is requested more than once")
        parameters = _parameters(raw.get("parameters"), where)
        if "classification" in parameters:
            raise BadRequest(f"{where}: classification outputs are not supported")
        if "shared_memory_region" in parameters:
            raise BadRequest(f"{where}: shared memory is not supported")
        binary = parameters.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise BadRequest(f"{where}: parameters.binary_data must be true or false, got {_short(binary)}")
        outputs.append(RequestedOutput(raw["name"], binary))
    # An empty list asks for nothing in particular: like Triton, send every output.
    return outputs or None


# --- request: tensor data -------------------------------------------------------------------------------------------


def _binary_sections(headers: list[_InputHeader], tail: memoryview, has_header_length: bool) -> dict[str, memoryview]:
    """Split the bytes after the JSON header among the binary inputs, in input order; the sizes must add up exactly."""
    binary = [h for h in headers if h.binary_size is not None]
    declared = sum(h.binary_size or 0 for h in binary)
    if declared != len(tail):
        sizes = ", ".join(f"'{h.name}': {h.binary_size}" for h in binary) or "no binary inputs"
        if not has_header_length:
            raise BadRequest(
                f"binary input data ({sizes}) needs the {HEADER_LENGTH_HEADER} header (the length of the JSON part)"
            )
        raise BadRequest(
            f"binary data: expected {declared} bytes after the JSON header ({sizes}), got {len(tail)} bytes"
        )
    sections = {}
    offset = 0
    for h in binary:
        size = h.binary_size or 0
        sections[h.name] = tail[offset : offset + size]
        offset += size
    return sections


def _decode(header: _InputHeader, section: memoryview | None) -> np.ndarray:
    where = f"input '{header.name}'"
    if section is None:
        flat = _flatten(where, header.data, header.shape)
        return _json_array(where, header.datatype, flat).reshape(header.shape)
    return _binary_array(where, header.datatype, header.shape, section)


def _flatten(where: str, data: Any, shape: tuple[int, ...]) -> list[Any]:
    """`data` as one flat list: either already flat, or nested lists that follow `shape` exactly."""
    if not isinstance(data, list):
        raise BadRequest(f"{where}: 'data' must be a list, got {_type_name(data)}")
    count = math.prod(shape)
    if not shape or list not in set(map(type, data)):
        if len(data) != count:
            raise BadRequest(f"{where}: 'data' has {len(data)} elements but shape {list(shape)} needs {count}")
        return data
    level: list[Any] = [data]
    for depth, dim in enumerate(shape):
        if level and (set(map(type, level)) != {list} or set(map(len, level)) != {dim}):
            raise BadRequest(
                f"{where}: nested 'data' does not follow shape {list(shape)} at depth {depth}; "
                f"send lists nested like the shape, or one flat list of {count} elements"
            )
        level = list(chain.from_iterable(level))
    return level


def _json_array(where: str, datatype: str, flat: list[Any]) -> np.ndarray:
    """Validate element types and ranges with C-speed passes (set/min/max), then convert in one numpy call."""
    allowed = _JSON_TYPES[datatype]
    if not set(map(type, flat)) <= allowed:
        bad = next(value for value in flat if type(value) not in allowed)
        if isinstance(bad, list):
            raise BadRequest(f"{where}: 'data' is nested deeper than the shape")
        raise BadRequest(f"{where}: {datatype} data must be {_KIND[datatype]}, got {_short(bad)}")
    dtype = NUMPY_DTYPES[datatype]
    if datatype == "BYTES":
        strings = np.empty(len(flat), dtype=object)
        try:
            strings[:] = [value.encode() for value in flat]
        except UnicodeEncodeError:  # JSON can carry lone surrogates (\ud800) that UTF-8 cannot
            index = next(i for i, value in enumerate(flat) if not _encodable(value))
            raise BadRequest(f"{where} element {index} is not valid Unicode text (a lone surrogate)") from None
        return strings
    if datatype in _FLOAT_TYPES:
        floats = _finite_array(flat, dtype)
        if floats is None:
            bad = next(value for value in flat if _finite_array([value], dtype) is None)
            raise BadRequest(f"{where}: value {_short(bad)} is out of range for {datatype}")
        return floats
    if datatype != "BOOL" and flat:
        info = np.iinfo(dtype)
        if min(flat) < info.min or max(flat) > info.max:
            bad = next(value for value in flat if not info.min <= value <= info.max)
            raise BadRequest(f"{where}: value {bad} is out of range for {datatype} ({info.min}..{info.max})")
    return np.asarray(flat, dtype=dtype)


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _finite_array(values: list[int | float], dtype: np.dtype[Any]) -> np.ndarray | None:
    """`values` as floats of `dtype`, or None when one overflows it (strict JSON has no NaN/Inf, so any is overflow)."""
    try:
        with np.errstate(over="ignore"):
            array = np.asarray(values, dtype=dtype)
    except OverflowError:  # an int beyond float64
        return None
    return array if np.isfinite(array).all() else None


def _binary_array(where: str, datatype: str, shape: tuple[int, ...], section: memoryview) -> np.ndarray:
    if datatype == "BYTES":
        return _binary_bytes_elements(where, section, math.prod(shape)).reshape(shape)
    if datatype == "BOOL":
        raw = np.frombuffer(section, dtype=np.uint8)
        if (raw > 1).any():
            raise BadRequest(f"{where}: BOOL binary data must be bytes 0 (false) or 1 (true)")
        return raw.astype(np.bool_).reshape(shape)
    # A copy: the array outlives the request body and stays writable (torch.from_numpy wants that).
    return np.frombuffer(section, dtype=NUMPY_DTYPES[datatype]).reshape(shape).copy()


def _binary_bytes_elements(where: str, section: memoryview, count: int) -> np.ndarray:
    """BYTES binary data: per element a 4-byte little-endian length, then that many bytes; nothing left over."""
    size = len(section)
    if count * 4 > size:
        raise BadRequest(
            f"{where}: BYTES binary data of {size} bytes cannot hold {count} elements "
            f"(each is a 4-byte little-endian length, then its bytes)"
        )
    array = np.empty(count, dtype=object)
    offset = 0
    for index in range(count):
        if offset + 4 > size:
            raise BadRequest(f"{where}: BYTES binary data ends before element {index} of {count}")
        (length,) = _U32.unpack_from(section, offset)
        offset += 4
        if offset + length > size:
            raise BadRequest(
                f"{where}: BYTES element {index} declares {length} bytes but only {size - offset} bytes remain"
            )
        array[index] = bytes(section[offset : offset + length])
        offset += length
    if offset != size:
        raise BadRequest(f"{where}: BYTES binary data has {size - offset} bytes left over after its {count} elements")
    return array


# --- response -------------------------------------------------------------------------------------------------------


def _output_array(tensor: Tensor) -> np.ndarray:
    if tensor.datatype not in NUMPY_DTYPES:
        raise ValueError(f"output '{tensor.name}': unknown datatype {tensor.datatype!r}")
    shape = tuple(int(dim) for dim in tensor.shape)
    if tensor.data.size != math.prod(shape):
        raise ValueError(f"output '{tensor.name}': {tensor.data.size} elements do not fill shape {list(shape)}")
    return np.asarray(tensor.data).reshape(shape)


def _bytes_elements(name: str, data: np.ndarray) -> list[bytes]:
    elements = []
    for value in data.reshape(-1).tolist():
        if isinstance(value, str):
            value = value.encode()
        if not isinstance(value, bytes):
            raise ValueError(f"output '{name}': BYTES elements must be bytes or str, got {type(value).__name__}")
        elements.append(value)
    return elements


def _binary_bytes(name: str, datatype: str, data: np.ndarray) -> bytes:
    if datatype == "BYTES":
        return b"".join(_U32.pack(len(value)) + value for value in _bytes_elements(name, data))
    return np.ascontiguousarray(data, dtype=NUMPY_DTYPES[datatype]).tobytes()


def _json_data(name: str, datatype: str, data: np.ndarray) -> str:
    if datatype == "BYTES":
        try:
            return _dumps([value.decode() for value in _bytes_elements(name, data)])
        except UnicodeDecodeError:
            raise ValueError(
                f"output '{name}' holds bytes that are not UTF-8, which JSON cannot carry; "
                f"request it with parameters.binary_data = true"
            ) from None
    flat = data.reshape(-1).astype(NUMPY_DTYPES[datatype], copy=False)
    if datatype not in _FLOAT_TYPES:
        return _dumps(flat.tolist())
    if not np.isfinite(flat).all():
        raise ValueError(
            f"output '{name}' holds NaN or infinite values, which JSON cannot carry; "
            f"request it with parameters.binary_data = true"
        )
    # numpy's str() is the shortest decimal that reads back to the same FP16/FP32 value: exact and ~2x shorter than
    # the float64 repr json.dumps would write.
    return "[" + ",".join(flat.astype(str).tolist()) + "]"


# --- helpers --------------------------------------------------------------------------------------------------------


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."
