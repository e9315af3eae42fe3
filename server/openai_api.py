"""OpenAI embeddings API codec (POST /v1/embeddings): request JSON → EmbeddingsRequest, vectors → response JSON.

Pure functions: no HTTP, no model. Errors on /v1 routes use `openai_error_body` so the openai client shows them.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np

from warmpod.server.errors import BadRequest
from warmpod.server.v2 import load_json

EncodingFormat = Literal["float", "base64"]
ENCODING_FORMATS: tuple[EncodingFormat, ...] = ("float", "base64")


@dataclass
class EmbeddingsRequest:
    """A validated embeddings request: one or more non-empty texts."""

    model: str
    texts: list[str]
    encoding_format: EncodingFormat
    dimensions: int | None
    user: str | None


def parse_embeddings_request(body: bytes) -> EmbeddingsRequest:
    """Decode and validate an embeddings request; unknown fields are ignored, as the OpenAI API does. How many
    inputs a request may have is the server's limit (warmpod.server.limits, --max-request-rows: 2,048 by default)."""
    request = load_json(body)
    if not isinstance(request, dict):
        raise BadRequest("the request body must be a JSON object with 'model' and 'input'")

    model = request.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required: the name of the model to use (a non-empty string)")

    encoding_format = request.get("encoding_format")
    if encoding_format is None:
        encoding_format = "float"
    elif encoding_format not in ENCODING_FORMATS:
        raise BadRequest(f"'encoding_format' must be 'float' or 'base64', got {json.dumps(encoding_format)}")

    dimensions = request.get("dimensions")
    if dimensions is not None and (type(dimensions) is not int or dimensions <= 0):
        raise BadRequest(f"'dimensions' must be a positive integer, got {json.dumps(dimensions)}")

    user = request.get("user")
    if user is not None and not isinstance(user, str):
        raise BadRequest("'user' must be a string")

    texts = _texts(request.get("input"))
    return EmbeddingsRequest(model, texts, cast(EncodingFormat, encoding_format), dimensions, user)


def check_dimensions(requested: int | None, model_dim: int) -> None:
    """This server returns the model's full vectors: `dimensions`, when given, must be exactly their size."""
    if requested is not None and requested != model_dim:
        raise BadRequest(
            f"'dimensions' is {requested} but this model returns {model_dim}-dimensional embeddings; "
            f"omit 'dimensions' or set it to {model_dim}"
        )


def encode_embeddings_response(
    model: str, vectors: np.ndarray, encoding_format: EncodingFormat, prompt_tokens: int
) -> bytes:
    """The response body for `vectors` of shape (n, d), in request order.

    base64 is the float32 little-endian bytes of each vector. float uses the shortest decimal that reads back to the
    same float32; NaN/Inf raise ValueError there (JSON cannot carry them).
    """
    if vectors.ndim != 2:
        raise ValueError(f"vectors must have shape (n, d), got {vectors.shape}")
    floats = np.ascontiguousarray(vectors, dtype="<f4")
    if encoding_format == "base64":
        embeddings = [json.dumps(base64.b64encode(row.tobytes()).decode("ascii")) for row in floats]
    else:
        if not np.isfinite(floats).all():
            raise ValueError("embeddings hold NaN or infinite values, which JSON cannot carry")
        embeddings = ["[" + ",".join(row) + "]" for row in floats.astype(str).tolist()]
    data = ",".join(
        f'{{"object":"embedding","index":{index},"embedding":{embedding}}}'
        for index, embedding in enumerate(embeddings)
    )
    usage = f'{{"prompt_tokens":{int(prompt_tokens)},"total_tokens":{int(prompt_tokens)}}}'
    return f'{{"object":"list","data":[{data}],"model":{json.dumps(model)},"usage":{usage}}}'.encode()


def model_object(model: str, created: float) -> dict[str, Any]:
    """OpenAI's model object (GET /v1/models lists them, GET /v1/models/{id} returns one)."""
    return {"id": model, "object": "model", "created": int(created), "owned_by": "warmpod"}


def openai_error_body(message: str, type_: str, code: str | None) -> bytes:
    """An error body in OpenAI's shape, e.g. type_ "invalid_request_error" for a 400."""
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


def _texts(value: Any) -> list[str]:
    if value is None:
        raise BadRequest("'input' is required: a string or a list of strings")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list):
        raise BadRequest("'input' must be a string or a list of strings")
    if not texts:
        raise BadRequest("'input' is an empty list: send at least one string")
    for index, text in enumerate(texts):
        if isinstance(text, str):
            where = "'input'" if isinstance(value, str) else f"'input'[{index}]"
            if not text:
                raise BadRequest(f"{where} is an empty string; every input must have text")
            _check_encodable(where, text)
        elif type(text) is int or isinstance(text, list):
            raise BadRequest("'input' holds token ids; this server accepts only text (a string or a list of strings)")
        else:
            raise BadRequest(f"'input'[{index}] must be a string, got {json.dumps(text)}")
    return texts


def _check_encodable(where: str, text: str) -> None:
    """JSON can carry lone surrogates (\\ud800) that no UTF-8 text contains: refuse them, naming the position."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(f"{where} is not valid Unicode text: a lone surrogate at character {e.start}") from None
