"""The one exception tree of thinker, shared by the server and the Python client.

Each class carries the HTTP status it maps to. The server turns any ThinkerError into
JSON ``{"error": message, "type": class name}`` with that status; the client turns a
status (and the ``type`` field) back into the same class, so callers catch one tree
whichever side raised.
"""

from __future__ import annotations

import re

# Errors quote what the client sent (ids, keys, names); a quote is cut to this, so a 10 MB
# key is never echoed back. No word of a message of ours is this long.
MAX_QUOTE_CHARS = 200
MAX_MESSAGE_CHARS = 2000  # a whole error message, whatever it quotes
_LONG_WORD = re.compile(rf"\S{{{MAX_QUOTE_CHARS + 1},}}")


def clip(text: str, limit: int = MAX_QUOTE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def clip_message(message: str) -> str:
    """An error message with every over-long word (a quoted client value) clipped, and cut
    to MAX_MESSAGE_CHARS in all: what every ThinkerError carries."""
    return clip(_LONG_WORD.sub(lambda word: clip(word.group()), message), MAX_MESSAGE_CHARS)


class ThinkerError(Exception):
    """Base of every error thinker raises on purpose."""

    status_code: int = 500

    def __init__(self, message: str) -> None:
        message = clip_message(message)
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict:
        return {"error": self.message, "type": type(self).__name__}


class BadRequestError(ThinkerError, ValueError):
    """The request is malformed or a value is out of range (the message names the field)."""

    status_code = 400


class AuthenticationError(ThinkerError):
    """No valid API key was sent."""

    status_code = 401


class NotFoundError(ThinkerError, LookupError):
    """An unknown model_id, request_id or route."""

    status_code = 404


class ConflictError(ThinkerError):
    """The request clashes with the current state of a resource."""

    status_code = 409


class StorageQuotaError(ThinkerError):
    """A save would take the caller's checkpoints past MAX_STORAGE_BYTES_PER_USER (the message
    names the limit, the bytes used and how to free some). 403, not 429 or 5xx: waiting does
    not help, so clients must not retry it."""

    status_code = 403


class PayloadTooLargeError(ThinkerError):
    """The request body is larger than the server accepts."""

    status_code = 413


class RateLimitError(ThinkerError):
    """Too much pending work; retry later (the answer carries a Retry-After header)."""

    status_code = 429

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InsufficientStorageError(ThinkerError):
    """The data disk is full: what needed new disk space was refused (and left nothing behind)."""

    status_code = 507


class ServiceUnavailableError(ThinkerError):
    """The server takes no new work right now (it is draining to shut down); retry after
    the Retry-After header's seconds, when a restarted server answers."""

    status_code = 503

    def __init__(self, message: str, retry_after_s: int = 10) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ServerError(ThinkerError):
    """An unexpected failure inside the server."""

    status_code = 500


class RequestFailedError(ThinkerError):
    """A queued job ran and failed; the message carries the reason from the worker."""

    status_code = 500


class ConfigurationError(ThinkerError, ValueError):
    """The server was started with settings it cannot honour."""

    status_code = 500


_BY_NAME: dict[str, type[ThinkerError]] = {
    cls.__name__: cls
    for cls in (
        BadRequestError,
        AuthenticationError,
        NotFoundError,
        ConflictError,
        StorageQuotaError,
        PayloadTooLargeError,
        RateLimitError,
        InsufficientStorageError,
        ServiceUnavailableError,
        ServerError,
        RequestFailedError,
        ConfigurationError,
    )
}

_BY_STATUS: dict[int, type[ThinkerError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    429: RateLimitError,
    507: InsufficientStorageError,
    503: ServiceUnavailableError,
}


def error_from_response(status: int, body: dict | None) -> ThinkerError:
    """Rebuild the exception a server response stands for (used by the client)."""
    body = body or {}
    message = str(body.get("error") or f"HTTP {status}")
    cls = _BY_NAME.get(str(body.get("type")))
    if cls is None:
        cls = _BY_STATUS.get(status, ServerError if status >= 500 else BadRequestError)
    return cls(message)
