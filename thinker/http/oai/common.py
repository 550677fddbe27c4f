"""What the OpenAI-compatible routes share: the blueprint, its OpenAI-shaped errors, and
the name the base model is served under.

Errors under /oai are ``{"error": {"message", "type", "param", "code"}}`` (what OpenAI
clients parse), with the same statuses as the rest of the server; ``param`` is the field a
400 names (our messages start with it: ``"temperature: ..."``).
"""

from __future__ import annotations

import logging
import re

from flask import Blueprint, current_app, jsonify
from werkzeug.exceptions import HTTPException

from thinker.core.errors import ThinkerError, clip_message

log = logging.getLogger("thinker.oai")

bp = Blueprint("oai", __name__, url_prefix="/oai/api/v1")

# OpenAI's error types, by status (its clients map statuses to exception classes; the type is
# for people and logs).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}
_PARAM = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")  # "messages[0].content: ..." -> that field


class ModelNotFoundError(ThinkerError, LookupError):
    """``model`` names nothing the caller may use (OpenAI's code: model_not_found)."""

    status_code = 404
    code = "model_not_found"


def services():
    return current_app.extensions["thinker"]


def served_model_name() -> str:
    """The name the base model is served under (SERVED_MODEL_NAME, the same name every Tinker
    endpoint reports): what /models lists and responses echo."""
    # Imported here: thinker.http.services imports the Tinker package, whose modules import
    # services again, so a module-level import makes a cycle when this package loads first.
    from thinker.http.services import served_model_name as shared_served_name

    return shared_served_name(services())


def error_body(message: str, status: int, code: str | None = None) -> dict:
    match = _PARAM.match(message) if status == 400 else None
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": match and match.group(1), "code": code}}


@bp.errorhandler(ThinkerError)
def _thinker_error(exc: ThinkerError):
    retry_after_s = getattr(exc, "retry_after_s", None)
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else {}
    code = getattr(exc, "code", None) or _CODES.get(exc.status_code)
    return jsonify(error_body(exc.message, exc.status_code, code)), exc.status_code, headers


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException):
    status = exc.code or 500
    return jsonify(error_body(clip_message(str(exc.description)), status)), status


@bp.errorhandler(Exception)
def _unexpected(exc: Exception):
    log.exception("unhandled error")
    return jsonify(error_body(clip_message(f"{type(exc).__name__}: {exc}"), 500)), 500
