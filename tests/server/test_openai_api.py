"""The embeddings codec against the real openai client (its HTTP transport replaced by our parse → encode)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx2
import numpy as np
import openai
import pytest
from openai.types import CreateEmbeddingResponse

from warmpod.server.errors import BadRequest, PayloadTooLarge
from warmpod.server.limits import RequestLimits
from warmpod.server.openai_api import (
    EmbeddingsRequest,
    check_dimensions,
    encode_embeddings_response,
    openai_error_body,
    parse_embeddings_request,
)

DIM = 8


def fake_vectors(texts: list[str]) -> np.ndarray:
    """Deterministic float32 vectors with awkward values (tiny, huge, negative zero) per text."""
    rng = np.random.default_rng(len(texts))
    vectors = rng.standard_normal((len(texts), DIM)).astype(np.float32)
    vectors[:, 0] = [len(text) / 3 for text in texts]
    vectors[0, 1:4] = np.array([np.finfo(np.float32).smallest_subnormal, np.finfo(np.float32).max, -0.0], np.float32)
    return vectors


@pytest.fixture
def served() -> Iterator[tuple[openai.OpenAI, list[EmbeddingsRequest]]]:
    """An openai client whose requests go to parse_embeddings_request → encode_embeddings_response (no sockets)."""
    seen: list[EmbeddingsRequest] = []

    def handle(request: httpx2.Request) -> httpx2.Response:
        assert request.url.path == "/v1/embeddings"
        try:
            parsed = parse_embeddings_request(request.content)
            check_dimensions(parsed.dimensions, DIM)
        except BadRequest as e:
            body = openai_error_body(str(e), "invalid_request_error", None)
            return httpx2.Response(400, content=body, headers={"content-type": "application/json"})
        seen.append(parsed)
        body = encode_embeddings_response(parsed.model, fake_vectors(parsed.texts), parsed.encoding_format, 11)
        return httpx2.Response(200, content=body, headers={"content-type": "application/json"})

    http_client = httpx2.Client(transport=httpx2.MockTransport(handle))
    client = openai.OpenAI(api_key="unused", base_url="http://warmpod.test/v1", http_client=http_client, max_retries=0)
    try:
        yield client, seen
    finally:
        client.close()


# ---------------------------------------------------------------- the real client end to end


def test_client_default_goes_base64_and_decodes_exactly(
    served: tuple[openai.OpenAI, list[EmbeddingsRequest]],
) -> None:
    client, seen = served
    texts = ["hello", "wörld", "a longer sentence"]

    response = client.embeddings.create(model="minilm", input=texts)

    # The openai client asks for base64 when the caller names no format, then decodes it into floats.
    assert seen[0] == EmbeddingsRequest("minilm", texts, "base64", None, None)
    want = fake_vectors(texts)
    assert [item.index for item in response.data] == [0, 1, 2]
    got = np.array([item.embedding for item in response.data], dtype=np.float32)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert (response.model, response.usage.prompt_tokens, response.usage.total_tokens) == ("minilm", 11, 11)


def test_client_float_format_preserves_float32_exactly(
    served: tuple[openai.OpenAI, list[EmbeddingsRequest]],
) -> None:
    client, seen = served

    response = client.embeddings.create(model="minilm", input="one text", encoding_format="float", user="u-1")

    assert seen[0] == EmbeddingsRequest("minilm", ["one text"], "float", None, "u-1")
    got = np.array([item.embedding for item in response.data], dtype=np.float32)
    assert np.array_equal(got.view(np.uint32), fake_vectors(["one text"]).view(np.uint32))


def test_client_explicit_base64_gets_the_raw_string(served: tuple[openai.OpenAI, list[EmbeddingsRequest]]) -> None:
    client, _ = served

    response = client.embeddings.create(model="minilm", input=["x"], encoding_format="base64")

    raw = response.data[0].embedding
    assert isinstance(raw, str)
    assert np.array_equal(np.frombuffer(base64.b64decode(raw), dtype="<f4"), fake_vectors(["x"])[0])


def test_client_sees_our_error_message(served: tuple[openai.OpenAI, list[EmbeddingsRequest]]) -> None:
    client, _ = served

    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="minilm", input="x", dimensions=3)

    assert info.value.status_code == 400
    assert "'dimensions' is 3 but this model returns 8-dimensional embeddings" in info.value.message
    assert info.value.type == "invalid_request_error"


def test_client_token_ids_are_refused(served: tuple[openai.OpenAI, list[EmbeddingsRequest]]) -> None:
    client, _ = served
    with pytest.raises(openai.BadRequestError, match="accepts only text"):
        client.embeddings.create(model="minilm", input=[[1, 2, 3]])


def test_client_matching_dimensions_are_accepted(served: tuple[openai.OpenAI, list[EmbeddingsRequest]]) -> None:
    client, seen = served
    client.embeddings.create(model="minilm", input="x", dimensions=DIM)
    assert seen[0].dimensions == DIM


# ---------------------------------------------------------------- response body


def test_float_response_validates_as_the_client_model() -> None:
    vectors = fake_vectors(["a", "bb"])

    body = encode_embeddings_response("m", vectors, "float", 5)

    parsed = CreateEmbeddingResponse.model_validate_json(body)
    assert parsed.object == "list" and parsed.model == "m" and parsed.usage.total_tokens == 5
    assert [(item.object, item.index) for item in parsed.data] == [("embedding", 0), ("embedding", 1)]
    assert np.array_equal(np.array([item.embedding for item in parsed.data], dtype=np.float32), vectors)
    assert json.loads(body)["data"][0]["embedding"][3] == 0.0  # -0.0 survives as a JSON number


def test_float_response_uses_shortest_float32_decimals() -> None:
    body = encode_embeddings_response("m", np.array([[0.1, -2.5]], dtype=np.float32), "float", 1)
    assert b'"embedding":[0.1,-2.5]' in body


def test_base64_response_is_float32_little_endian() -> None:
    vectors = fake_vectors(["a", "bb"])

    body = encode_embeddings_response("m", vectors, "base64", 2)

    data = json.loads(body)["data"]
    for index, item in enumerate(data):
        assert np.array_equal(np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4"), vectors[index])


def test_nan_in_float_response_is_refused_but_base64_carries_it() -> None:
    vectors = np.array([[1.0, np.nan]], dtype=np.float32)
    with pytest.raises(ValueError, match="NaN or infinite"):
        encode_embeddings_response("m", vectors, "float", 1)
    body = encode_embeddings_response("m", vectors, "base64", 1)
    decoded = np.frombuffer(base64.b64decode(json.loads(body)["data"][0]["embedding"]), dtype="<f4")
    assert np.isnan(decoded[1])


def test_vectors_must_be_two_dimensional() -> None:
    with pytest.raises(ValueError, match=r"shape \(n, d\)"):
        encode_embeddings_response("m", np.zeros(3, np.float32), "float", 1)


def test_openai_error_body() -> None:
    assert json.loads(openai_error_body("bad input", "invalid_request_error", "x")) == {
        "error": {"message": "bad input", "type": "invalid_request_error", "param": None, "code": "x"}
    }


# ---------------------------------------------------------------- request parsing


def parse(**fields: Any) -> EmbeddingsRequest:
    return parse_embeddings_request(json.dumps(fields).encode())


def test_parse_single_string_with_defaults() -> None:
    assert parse(model="m", input="hi") == EmbeddingsRequest("m", ["hi"], "float", None, None)


def test_parse_all_fields_and_ignore_unknown_ones() -> None:
    request = parse(model="m", input=["a", "b"], encoding_format="base64", dimensions=384, user="u", extra={"x": 1})
    assert request == EmbeddingsRequest("m", ["a", "b"], "base64", 384, "u")


def test_parse_null_optional_fields_are_defaults() -> None:
    request = parse(model="m", input="a", encoding_format=None, dimensions=None, user=None)
    assert request == EmbeddingsRequest("m", ["a"], "float", None, None)


def test_check_dimensions() -> None:
    check_dimensions(None, 384)
    check_dimensions(384, 384)
    with pytest.raises(BadRequest, match="'dimensions' is 256 but this model returns 384-dimensional"):
        check_dimensions(256, 384)


def bad(body: bytes | dict[str, Any], **kwargs: Any) -> str:
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    with pytest.raises(BadRequest) as info:
        parse_embeddings_request(raw, **kwargs)
    assert info.value.status == 400
    return str(info.value)


def test_malformed_json() -> None:
    assert "malformed JSON in the request: Expecting value at line 1 column 10 (char 9)" in bad(b'{"model":}')


def test_non_utf8_json() -> None:
    assert "not valid UTF-8" in bad(b'{"model": "\xff"}')


def test_body_not_an_object() -> None:
    assert "must be a JSON object" in bad(b'["a"]')


@pytest.mark.parametrize("model", [None, "", 5, ["m"]])
def test_model_is_required(model: Any) -> None:
    body = {"input": "a"} if model is None else {"model": model, "input": "a"}
    assert "'model' is required" in bad(body)


def test_input_is_required() -> None:
    assert "'input' is required" in bad({"model": "m"})


@pytest.mark.parametrize("value", [5, {"text": "a"}, True])
def test_input_must_be_text(value: Any) -> None:
    assert "'input' must be a string or a list of strings" in bad({"model": "m", "input": value})


@pytest.mark.parametrize("value", [[1, 2, 3], [[1, 2], [3]], ["a", 5]])
def test_token_ids_are_refused(value: Any) -> None:
    assert "accepts only text" in bad({"model": "m", "input": value})


def test_non_string_item() -> None:
    assert "'input'[1] must be a string, got null" in bad({"model": "m", "input": ["a", None]})


def test_empty_list() -> None:
    assert "'input' is an empty list" in bad({"model": "m", "input": []})


def test_empty_string() -> None:
    assert "'input' is an empty string" in bad({"model": "m", "input": ""})


def test_empty_string_in_list() -> None:
    assert "'input'[1] is an empty string" in bad({"model": "m", "input": ["a", "", "b"]})


def test_too_many_inputs_is_413_naming_the_limit_and_its_flag() -> None:
    """How many inputs a request may have is the server's --max-request-rows (OpenAI's 2,048 by default): over it is
    413, not 400, with the request's size, the limit and the flag that raises it."""
    limits = RequestLimits(max_rows=2)
    with pytest.raises(PayloadTooLarge) as info:
        limits.check_rows(
            len(parse_embeddings_request(json.dumps({"model": "m", "input": ["a", "b", "c"]}).encode()).texts)
        )
    assert info.value.status == 413
    assert str(info.value) == (
        "the request has 3 rows; this server takes at most 2 per request (--max-request-rows): send fewer per "
        "request, or raise --max-request-rows"
    )
    RequestLimits().check_rows(
        len(parse_embeddings_request(json.dumps({"model": "m", "input": ["a"] * 2048}).encode()).texts)
    )
    with pytest.raises(PayloadTooLarge, match="has 2049 rows; this server takes at most 2048"):
        RequestLimits().check_rows(2049)


def test_too_many_tokens_is_413_naming_the_limit_and_its_flag() -> None:
    with pytest.raises(PayloadTooLarge) as info:
        RequestLimits(max_tokens=100).check_tokens(101)
    assert info.value.status == 413
    assert "texts are 101 tokens in total; this server takes at most 100 per request (--max-request-tokens)" in str(
        info.value
    )
    RequestLimits().check_tokens(300_000)


@pytest.mark.parametrize("value", ["int8", "FLOAT", 1, ["float"]])
def test_bad_encoding_format(value: Any) -> None:
    assert "'encoding_format' must be 'float' or 'base64'" in bad(
        {"model": "m", "input": "a", "encoding_format": value}
    )


@pytest.mark.parametrize("value", [0, -1, 1.5, "384", True])
def test_bad_dimensions(value: Any) -> None:
    assert "'dimensions' must be a positive integer" in bad({"model": "m", "input": "a", "dimensions": value})


def test_bad_user() -> None:
    assert "'user' must be a string" in bad({"model": "m", "input": "a", "user": 7})
