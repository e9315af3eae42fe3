"""What one request may cost, checked before any forward pass: rows (texts or tensor rows) and tokens.

Over a limit is 413 with a message naming the limit, the flag that raises it and the request's size. Defaults:
2,048 rows (OpenAI's per-request input limit for embeddings, applied to V2 too) and 300,000 tokens in total
(OpenAI's per-request token limit for embeddings).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from warmpod.server.errors import PayloadTooLarge
from warmpod.server.tensors import Tensor

DEFAULT_MAX_ROWS = 2048
DEFAULT_MAX_TOKENS = 300_000


@dataclass(frozen=True)
class RequestLimits:
    max_rows: int = DEFAULT_MAX_ROWS
    max_tokens: int = DEFAULT_MAX_TOKENS

    def check_rows(self, rows: int) -> None:
        if rows > self.max_rows:
            raise PayloadTooLarge(
                f"the request has {rows} rows; this server takes at most {self.max_rows} per request "
                f"(--max-request-rows): send fewer per request, or raise --max-request-rows"
            )

    def check_tokens(self, tokens: int) -> None:
        if tokens > self.max_tokens:
            raise PayloadTooLarge(
                f"the request's texts are {tokens} tokens in total; this server takes at most {self.max_tokens} "
                "per request (--max-request-tokens): send fewer or shorter texts per request, or raise "
                "--max-request-tokens"
            )


def request_rows(inputs: Mapping[str, Tensor]) -> int:
    """A V2 request's rows: the largest first dimension among its inputs (0 for scalars), before any decoding
    work; the model's own checks say when inputs disagree."""
    return max((t.shape[0] for t in inputs.values() if len(t.shape) > 0), default=0)
