"""The server's errors: `ServerError` (under warmpod's root) and one class per kind, each carrying the HTTP status
it maps to (one middleware, in warmpod.server.app, turns them into each protocol's JSON)."""

from __future__ import annotations

from warmpod.errors import WarmpodError


class ServerError(WarmpodError):
    """A request (or a model at start) failed for a reason the caller can act on; the message says which."""

    status = 500
    reason = "error"  # the label of warmpod_requests_rejected_total


class BadRequest(ServerError):
    """The request breaks the protocol or the model's input contract."""

    status = 400
    reason = "bad_request"


class NotFound(ServerError):
    """Unknown model, version or route."""

    status = 404
    reason = "not_found"


class PayloadTooLarge(ServerError):
    status = 413
    reason = "too_large"


class Unavailable(ServerError):
    """Try again later: the queue is full, the server is draining, or the model is not ready yet."""

    status = 503
    reason = "unavailable"

    def __init__(self, message: str, *, reason: str = "unavailable", retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


class Unauthorized(ServerError):
    """No credential, or one the server does not know: 401 with `WWW-Authenticate: Bearer`."""

    status = 401
    reason = "unauthorized"
    challenge = 'Bearer realm="warmpod"'  # the WWW-Authenticate header; the door adds RFC 6750's error="..." code


class TooManyRequests(ServerError):
    """A tenant over its rate limit: 429 with `Retry-After` (whole seconds until it may send again)."""

    status = 429
    reason = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ServerError):
    status = 504
    reason = "deadline"


class ModelError(ServerError):
    """The staged files do not make a model this server can serve (raised at start, or when a new version arrives)."""

    status = 500
    reason = "model"
    exit_code = 5  # `warmpod serve` stops with 5 when its model cannot be served
