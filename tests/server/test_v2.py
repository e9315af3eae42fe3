"""The V2 codec against the real tritonclient: bodies it builds decode exactly, bodies we build it reads back."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton

from warmpod.server.errors import BadRequest
from warmpod.server.tensors import Tensor
from warmpod.server.v2 import (
    RequestedOutput,
    encode_infer_response,
    error_body,
    parse_header_length,
    parse_infer_request,
    select_outputs,
)

RNG = np.random.default_rng(7)

SAMPLES: dict[str, np.ndarray] = {
    "FP32": RNG.standard_normal((2, 3)).astype(np.float32),
    "INT64": np.array([[-(2**63), 2**63 - 1, 0], [1, -1, 42]], dtype=np.int64),
    "UINT8": np.array([[0, 255, 7], [1, 2, 3]], dtype=np.uint8),
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "FP16": RNG.standard_normal((2, 3)).astype(np.float16),
    "BYTES": np.array([[b"hello", "héllo".encode(), b""], [b"a", b"b c", "日本".encode()]], dtype=object),
}


def triton_request(
    arrays: dict[str, tuple[np.ndarray, bool]], outputs: list[Any] | None = None, request_id: str = ""
) -> tuple[bytes, int | None]:
    """A request body exactly as tritonclient.http sends it: name → (array, binary)."""
    inputs = []
    for name, (array, binary) in arrays.items():
        datatype = "BYTES" if array.dtype == object else triton.np_to_triton_dtype(array.dtype)
        infer_input = triton.InferInput(name, list(array.shape), datatype)
        infer_input.set_data_from_numpy(array, binary_data=binary)
        inputs.append(infer_input)
    body: bytes
    body, json_size = triton.InferenceServerClient.generate_request_body(inputs, outputs=outputs, request_id=request_id)
    return body, json_size


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    if want.dtype == object:
        assert got.tolist() == want.tolist()
        assert all(type(value) is bytes for value in got.reshape(-1))
    else:
        assert np.array_equal(got, want)


# ---------------------------------------------------------------- requests from tritonclient


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_tritonclient_request_decodes_exactly(datatype: str, binary: bool) -> None:
    body, json_size = triton_request({"x": (SAMPLES[datatype], binary)})
    assert (json_size is not None) == binary

    request = parse_infer_request(body, json_size)

    tensor = request.inputs["x"]
    assert (tensor.name, tensor.datatype, tensor.shape) == ("x", datatype, (2, 3))
    assert_same(tensor.data, SAMPLES[datatype])


def test_tritonclient_mixed_request_keeps_input_order_and_sections() -> None:
    non_utf8 = np.array([b"\xff\x00\xfe", b"ok"], dtype=object)
    arrays = {
        "a": (SAMPLES["FP32"], True),
        "b": (SAMPLES["INT64"], False),
        "c": (non_utf8, True),
        "d": (SAMPLES["FP16"], True),
        "e": (SAMPLES["BOOL"], False),
    }
    body, json_size = triton_request(arrays, request_id="req-1")

    request = parse_infer_request(body, json_size)

    assert request.id == "req-1"
    assert list(request.inputs) == list(arrays)
    for name, (array, _) in arrays.items():
        assert_same(request.inputs[name].data, array)


def test_tritonclient_requested_outputs_and_binary_default() -> None:
    outputs = [triton.InferRequestedOutput("y", binary_data=False), triton.InferRequestedOutput("z")]
    body, json_size = triton_request({"x": (SAMPLES["FP32"], False)}, outputs=outputs)

    request = parse_infer_request(body, json_size)

    assert request.outputs == [RequestedOutput("y", False), RequestedOutput("z", True)]
    assert request.binary_default is False
    assert select_outputs(request, ["z", "y", "w"]) == [("y", False), ("z", True)]


def test_tritonclient_without_outputs_asks_for_all_binary() -> None:
    body, json_size = triton_request({"x": (SAMPLES["FP32"], False)})

    request = parse_infer_request(body, json_size)

    assert request.outputs is None
    assert request.binary_default is True
    assert request.parameters == {"binary_data_output": True}
    assert select_outputs(request, ["p", "q"]) == [("p", True), ("q", True)]


def test_binary_numeric_inputs_are_writable_copies() -> None:
    body, json_size = triton_request({"x": (SAMPLES["FP32"], True)})
    data = parse_infer_request(body, json_size).inputs["x"].data
    assert data.flags.writeable and data.flags.owndata


# ---------------------------------------------------------------- responses read by tritonclient


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_reads_response(binary: bool) -> None:
    outputs = [(Tensor(f"out_{dt}", dt, array.shape, array), binary) for dt, array in SAMPLES.items()]

    body, header_length = encode_infer_response("mlp", "3", "req-9", outputs)

    assert (header_length is not None) == binary
    result = triton.InferResult.from_response_body(body, verbose=False, header_length=header_length)
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("mlp", "3", "req-9")
    for datatype, array in SAMPLES.items():
        got = result.as_numpy(f"out_{datatype}")
        if datatype == "BYTES" and not binary:
            # tritonclient leaves JSON strings as str
            assert got.tolist() == [[value.decode() for value in row] for row in array.tolist()]
        else:
            assert_same(got, array)


def test_tritonclient_reads_mixed_response_and_specials_in_binary() -> None:
    specials = np.array([np.nan, np.inf, -np.inf, -0.0], dtype=np.float32)
    raw = np.array([b"\xff\xfe", b""], dtype=object)
    outputs = [
        (Tensor("json_fp32", "FP32", (2, 3), SAMPLES["FP32"]), False),
        (Tensor("specials", "FP32", (4,), specials), True),
        (Tensor("json_int", "INT64", (2, 3), SAMPLES["INT64"]), False),
        (Tensor("raw", "BYTES", (2,), raw), True),
        (Tensor("empty", "FP32", (0, 3), np.zeros((0, 3), np.float32)), True),
    ]

    body, header_length = encode_infer_response("m", "1", None, outputs)

    assert header_length is not None
    header = json.loads(body[:header_length])
    assert "id" not in header
    result = triton.InferResult.from_response_body(body, header_length=header_length)
    assert_same(result.as_numpy("json_fp32"), SAMPLES["FP32"])
    assert np.array_equal(result.as_numpy("specials"), specials, equal_nan=True)
    assert np.signbit(result.as_numpy("specials")[3])
    assert_same(result.as_numpy("json_int"), SAMPLES["INT64"])
    assert_same(result.as_numpy("raw"), raw)
    assert result.as_numpy("empty").shape == (0, 3)


def test_json_floats_are_shortest_and_exact() -> None:
    values = RNG.standard_normal(10_000).astype(np.float32)
    values[:3] = np.array([0.1, np.finfo(np.float32).max, np.finfo(np.float32).smallest_subnormal], dtype=np.float32)

    body, _ = encode_infer_response("m", "1", None, [(Tensor("y", "FP32", (10_000,), values), False)])

    data = json.loads(body)["outputs"][0]["data"]
    assert body.count(b"0.1,") >= 1 and b"0.10000000149" not in body
    assert np.array_equal(np.asarray(data, dtype=np.float32), values)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_json_output_with_nan_or_inf_is_refused(value: float) -> None:
    tensor = Tensor("y", "FP32", (2,), np.array([1.0, value], dtype=np.float32))
    with pytest.raises(ValueError, match=r"NaN or infinite.*binary_data"):
        encode_infer_response("m", "1", None, [(tensor, False)])


def test_json_output_with_non_utf8_bytes_is_refused() -> None:
    tensor = Tensor("y", "BYTES", (1,), np.array([b"\xff"], dtype=object))
    with pytest.raises(ValueError, match=r"not UTF-8.*binary_data"):
        encode_infer_response("m", "1", None, [(tensor, False)])


def test_response_with_shape_that_does_not_fit_the_data_is_a_bug() -> None:
    tensor = Tensor("y", "FP32", (3,), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="do not fill shape"):
        encode_infer_response("m", "1", None, [(tensor, True)])


def test_error_body() -> None:
    assert json.loads(error_body("input 'x': bad")) == {"error": "input 'x': bad"}


# ---------------------------------------------------------------- JSON data forms


def request_body(*inputs: dict[str, Any], **fields: Any) -> bytes:
    return json.dumps({"inputs": list(inputs), **fields}).encode()


def one_input(datatype: str, shape: list[Any], data: Any) -> bytes:
    return request_body({"name": "x", "datatype": datatype, "shape": shape, "data": data})


def test_nested_and_flat_data_decode_alike() -> None:
    nested = parse_infer_request(one_input("INT32", [2, 3], [[1, 2, 3], [4, 5, 6]]), None).inputs["x"].data
    flat = parse_infer_request(one_input("INT32", [2, 3], [1, 2, 3, 4, 5, 6]), None).inputs["x"].data
    assert_same(nested, flat)
    assert nested.tolist() == [[1, 2, 3], [4, 5, 6]]


def test_json_numbers_convert_to_the_declared_dtype() -> None:
    request = parse_infer_request(one_input("FP64", [3], [1, 2.5, -0.0]), None)
    assert_same(request.inputs["x"].data, np.array([1.0, 2.5, -0.0]))
    uint64 = parse_infer_request(one_input("UINT64", [1], [2**64 - 1]), None).inputs["x"].data
    assert_same(uint64, np.array([2**64 - 1], dtype=np.uint64))


@pytest.mark.parametrize(
    ("shape", "data"),
    [([0], []), ([2, 0], [[], []]), ([2, 0], []), ([0, 3], [])],
)
def test_zero_element_tensors_are_allowed(shape: list[int], data: list[Any]) -> None:
    tensor = parse_infer_request(one_input("FP32", shape, data), None).inputs["x"]
    assert tensor.shape == tuple(shape)
    assert tensor.data.shape == tuple(shape) and tensor.data.dtype == np.float32


def test_zero_element_binary_input() -> None:
    body, json_size = triton_request({"x": (np.zeros((0, 4), np.float32), True)})
    assert parse_infer_request(body, json_size).inputs["x"].data.shape == (0, 4)


def test_scalar_shape_takes_one_element() -> None:
    assert parse_infer_request(one_input("INT8", [], [5]), None).inputs["x"].data.tolist() == 5


def test_bytes_json_data_are_utf8_encoded() -> None:
    data = parse_infer_request(one_input("BYTES", [2], ["héllo", ""]), None).inputs["x"].data
    assert data.tolist() == ["héllo".encode(), b""]


def test_request_parameters_and_id_are_kept() -> None:
    body = request_body(
        {"name": "x", "datatype": "BOOL", "shape": [1], "data": [True]}, id="abc", parameters={"priority": 2}
    )
    request = parse_infer_request(body, None)
    assert (request.id, request.outputs, request.binary_default) == ("abc", None, False)
    assert request.parameters == {"priority": 2}
    assert request.inputs["x"].data.tolist() == [True]


def test_empty_outputs_list_means_all_outputs() -> None:
    request = parse_infer_request(
        request_body({"name": "x", "datatype": "BOOL", "shape": [1], "data": [True]}, outputs=[]), None
    )
    assert request.outputs is None


# ---------------------------------------------------------------- bad requests


def bad(body: bytes | dict[str, Any], header_length: int | None = None) -> str:
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    with pytest.raises(BadRequest) as info:
        parse_infer_request(raw, header_length)
    assert info.value.status == 400
    return str(info.value)


def x_input(**fields: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]} | fields]}


def test_malformed_json_names_the_position() -> None:
    message = bad(b'{"inputs": [1, }')
    assert "malformed JSON" in message and "line 1 column 16 (char 15)" in message


def test_non_utf8_json() -> None:
    assert "not valid UTF-8" in bad(b'{"id": "\xff"}')


def test_nan_literal_is_not_json() -> None:
    assert "NaN is not valid JSON" in bad(
        b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [NaN]}]}'
    )


def test_body_must_be_an_object() -> None:
    assert "must be a JSON object" in bad(b"[1, 2]")


def test_missing_inputs() -> None:
    assert "no 'inputs'" in bad({"id": "1"})


def test_empty_inputs() -> None:
    assert "'inputs' is empty" in bad({"inputs": []})


def test_inputs_not_a_list() -> None:
    assert "'inputs' must be a list" in bad({"inputs": {"name": "x"}})


def test_input_not_an_object() -> None:
    assert "inputs[0] must be an object" in bad({"inputs": [7]})


def test_input_without_name() -> None:
    assert "inputs[0] needs a 'name'" in bad({"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]})


def test_input_without_datatype() -> None:
    assert "input 'x': missing 'datatype'" in bad({"inputs": [{"name": "x", "shape": [1], "data": [1]}]})


def test_input_without_shape() -> None:
    assert "input 'x': missing 'shape'" in bad({"inputs": [{"name": "x", "datatype": "FP32", "data": [1]}]})


def test_duplicate_input_names() -> None:
    one = {"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}
    assert "input 'x' appears more than once" in bad({"inputs": [one, one]})


def test_unknown_datatype_lists_the_supported_ones() -> None:
    message = bad(x_input(datatype="FLOAT32"))
    assert 'unknown datatype "FLOAT32"' in message and "BOOL, UINT8" in message and "BYTES" in message


def test_unhashable_datatype() -> None:
    assert 'unknown datatype ["FP32"]' in bad(x_input(datatype=["FP32"]))


def test_bf16_is_not_supported() -> None:
    assert "BF16 is not supported" in bad(x_input(datatype="BF16"))


@pytest.mark.parametrize("shape", [[-1], [2.0], ["2"], [True], 2, None])
def test_bad_shape(shape: Any) -> None:
    assert "'shape' must be a list of non-negative integers" in bad(x_input(shape=shape))


def test_element_count_must_match_shape() -> None:
    assert "'data' has 5 elements but shape [2, 3] needs 6" in bad(x_input(shape=[2, 3], data=[1, 2, 3, 4, 5]))


@pytest.mark.parametrize(
    "data",
    [[[1, 2], [3, 4]], [[1, 2, 3], [4, 5]], [[1, 2, 3], 4, 5, 6], [[1, 2], [3, 4], [5, 6]]],
)
def test_nested_data_must_follow_the_shape(data: Any) -> None:
    assert "nested 'data' does not follow shape [2, 3]" in bad(x_input(shape=[2, 3], data=data))


@pytest.mark.parametrize(("shape", "data"), [([2], [[1], [2]]), ([2, 1], [[[1]], [[2]]]), ([], [[1]])])
def test_data_nested_deeper_than_shape(shape: list[int], data: Any) -> None:
    assert "nested deeper than the shape" in bad(x_input(shape=shape, data=data))


def test_data_must_be_a_list() -> None:
    assert "'data' must be a list" in bad(x_input(data="1, 2"))


@pytest.mark.parametrize(
    ("datatype", "data", "fragment"),
    [
        ("FP32", [1.0, "2"], 'FP32 data must be numbers, got "2"'),
        ("FP32", [1.0, True], "FP32 data must be numbers, got true"),
        ("FP32", [1.0, None], "FP32 data must be numbers, got null"),
        ("INT32", [1, 2.5], "INT32 data must be integers, got 2.5"),
        ("INT32", [1, 2.0], "INT32 data must be integers, got 2.0"),
        ("INT64", [1, False], "INT64 data must be integers, got false"),
        ("BOOL", [True, 1], "BOOL data must be true or false, got 1"),
        ("BOOL", [True, "true"], 'BOOL data must be true or false, got "true"'),
        ("BYTES", ["a", 1], "BYTES data must be strings, got 1"),
        ("UINT8", [1, 256], "value 256 is out of range for UINT8 (0..255)"),
        ("UINT8", [-1, 2], "value -1 is out of range for UINT8 (0..255)"),
        ("INT8", [127, -129], "value -129 is out of range for INT8 (-128..127)"),
        ("INT64", [2**63, 0], f"value {2**63} is out of range for INT64"),
        ("FP32", [1.0, 1e39], "value 1e+39 is out of range for FP32"),
        ("FP16", [1.0, 70000], "value 70000 is out of range for FP16"),
        ("FP64", [1.0, 10**400], "value 1000000000"),
    ],
)
def test_element_values_must_fit_the_datatype(datatype: str, data: list[Any], fragment: str) -> None:
    assert f"input 'x': {fragment}" in bad(x_input(datatype=datatype, data=data))


def test_both_data_and_binary_size() -> None:
    assert "both 'data' and parameters.binary_data_size" in bad(x_input(parameters={"binary_data_size": 8}))


def test_neither_data_nor_binary_size() -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2]}]}
    assert "input 'x': no tensor data" in bad(body)


def test_shared_memory_is_not_supported() -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"shared_memory_region": "r"}}]}
    assert "shared memory is not supported" in bad(body)


@pytest.mark.parametrize("size", [-1, 1.5, "8", True])
def test_bad_binary_data_size(size: Any) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": size}}]}
    assert "binary_data_size must be a non-negative integer" in bad(body)


def test_bad_request_fields() -> None:
    assert "'id' must be a string" in bad(x_input() | {"id": 5})
    assert "binary_data_output must be true or false" in bad(x_input() | {"parameters": {"binary_data_output": 1}})
    assert "'parameters' must be an object" in bad(x_input() | {"parameters": [1]})


@pytest.mark.parametrize(
    ("outputs", "fragment"),
    [
        ({"name": "y"}, "'outputs' must be a list"),
        ([{"parameters": {}}], "outputs[0] must be an object with a 'name'"),
        (["y"], "outputs[0] must be an object with a 'name'"),
        ([{"name": "y"}, {"name": "y"}], "output 'y' is requested more than once"),
        ([{"name": "y", "parameters": {"binary_data": "yes"}}], "binary_data must be true or false"),
        ([{"name": "y", "parameters": {"classification": 3}}], "classification outputs are not supported"),
    ],
)
def test_bad_requested_outputs(outputs: Any, fragment: str) -> None:
    assert fragment in bad(x_input() | {"outputs": outputs})


def test_unknown_requested_output_lists_the_available_ones() -> None:
    request = parse_infer_request(json.dumps(x_input() | {"outputs": [{"name": "nope"}]}).encode(), None)
    with pytest.raises(BadRequest, match="unknown output 'nope'; this model's outputs are: y, z"):
        select_outputs(request, ["y", "z"])


# ---------------------------------------------------------------- bad binary data


def binary_body(binary_inputs: list[tuple[str, str, list[int], int]], tail: bytes) -> tuple[bytes, int]:
    """A JSON header declaring (name, datatype, shape, binary_data_size) inputs, then `tail`."""
    header = json.dumps(
        {
            "inputs": [
                {"name": name, "datatype": dt, "shape": shape, "parameters": {"binary_data_size": size}}
                for name, dt, shape, size in binary_inputs
            ]
        }
    ).encode()
    return header + tail, len(header)


@pytest.mark.parametrize("value", ["abc", "-1", "", "1.5", "0x10", "١٢"])
def test_invalid_header_length_value(value: str) -> None:
    with pytest.raises(BadRequest, match="Inference-Header-Content-Length must be a non-negative integer"):
        parse_header_length(value)


def test_header_length_value() -> None:
    assert parse_header_length(None) is None
    assert parse_header_length(" 120 ") == 120


def test_negative_header_length() -> None:
    body, _ = binary_body([], b"")
    assert "must not be negative" in bad(body, -1)


def test_header_length_beyond_the_body() -> None:
    body, _ = binary_body([("x", "FP32", [1], 4)], b"\0" * 4)
    assert f"is {len(body) + 1} but the body has only {len(body)} bytes" in bad(body, len(body) + 1)


def test_header_length_cutting_the_json() -> None:
    body, header_length = binary_body([("x", "FP32", [1], 4)], b"\0" * 4)
    assert "malformed JSON" in bad(body, header_length - 2)


@pytest.mark.parametrize(("tail", "got"), [(b"\0" * 7, 7), (b"\0" * 9, 9), (b"", 0)])
def test_binary_sizes_must_add_up_to_the_tail(tail: bytes, got: int) -> None:
    body, header_length = binary_body([("a", "FP32", [1], 4), ("b", "INT16", [2], 4)], tail)
    message = bad(body, header_length)
    assert f"expected 8 bytes after the JSON header ('a': 4, 'b': 4), got {got} bytes" in message


def test_trailing_bytes_without_binary_inputs() -> None:
    header = json.dumps(x_input()).encode()
    assert "expected 0 bytes after the JSON header (no binary inputs), got 3" in bad(header + b"abc", len(header))


def test_binary_input_without_header_length() -> None:
    body, _ = binary_body([("x", "FP32", [1], 4)], b"")
    assert "needs the Inference-Header-Content-Length header" in bad(body, None)


def test_fixed_size_binary_must_match_the_shape() -> None:
    body, header_length = binary_body([("x", "FP32", [2, 3], 20)], b"\0" * 20)
    assert "input 'x': binary_data_size is 20 bytes but shape [2, 3] of FP32 takes 6 * 4 = 24 bytes" in bad(
        body, header_length
    )


def test_bool_binary_must_be_0_or_1() -> None:
    body, header_length = binary_body([("x", "BOOL", [3], 3)], b"\x01\x00\x02")
    assert "BOOL binary data must be bytes 0 (false) or 1 (true)" in bad(body, header_length)


def bytes_elements(*values: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(value)) + value for value in values)


@pytest.mark.parametrize(
    ("shape", "tail", "fragment"),
    [
        ([3], bytes_elements(b"ab", b"c"), "binary data of 11 bytes cannot hold 3 elements"),
        ([2], bytes_elements(b"ab") + b"\x05\x00", "binary data ends before element 1 of 2"),
        (
            [2],
            bytes_elements(b"ab") + struct.pack("<I", 9) + b"abc",
            "element 1 declares 9 bytes but only 3 bytes remain",
        ),
        ([1], bytes_elements(b"ab") + b"zz", "binary data has 2 bytes left over after its 1 elements"),
        ([1], bytes_elements(b"ab", b""), "binary data has 4 bytes left over after its 1 elements"),
    ],
)
def test_malformed_bytes_binary(shape: list[int], tail: bytes, fragment: str) -> None:
    body, header_length = binary_body([("x", "BYTES", shape, len(tail))], tail)
    assert f"input 'x': BYTES {fragment}" in bad(body, header_length)
