"""What the Tinker API routes share: the blueprint, body parsing, job submission with the
result's rendering attached, and naming (runs, samplers, checkpoints)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flask import Blueprint, current_app, request

from backend.lora import adapters
from thinker.core.config import BUILTIN_TINY
from thinker.core.errors import BadRequestError, NotFoundError
from thinker.http.auth import check_owner
from thinker.http.schemas import parse_body
from thinker.http.services import (
    owned_checkpoint,  # noqa: F401 - shared with the seed API
    served_model_name,
)
from thinker.store.futures import FutureRecord

bp = Blueprint("tinker", __name__, url_prefix="/api/v1")

# How retrieve_future renders a completed result (FutureRecord.meta["render"]).
JSON, FORWARD_BACKWARD, SAMPLE, OPTIM = "json", "forward_backward", "sample", "optim"
LORA_ALPHA = 32.0  # Tinker's LoRA scaling is alpha / rank with alpha fixed at 32


def services():
    return current_app.extensions["thinker"]


def body(schema):
    try:
        decoded = json.loads(request.get_data(cache=False) or b"{}")
    except (ValueError, RecursionError) as exc:
        raise BadRequestError(f"the request body is not valid JSON ({type(exc).__name__})") from None
    return parse_body(schema, decoded)


def with_render(future: FutureRecord, render: str, **meta: Any) -> FutureRecord:
    future.meta.update(render=render, **meta)
    return future


def start_plain(key: str | None, kind: str, render: str, fn: Callable[[], Any]) -> Callable[[FutureRecord], None]:
    """A Sequencer start function that submits ``fn`` as a plain job."""

    pool = services().pool  # captured here: start may run later, outside the request

    def start(future: FutureRecord) -> None:
        with_render(future, render)
        pool.submit(key, kind, fn, future=future)

    return start


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def session_of(model_id: str) -> str:
    """The session a Tinker model id belongs to ("<session>:train:<n>"); other ids stand alone."""
    return model_id.split(":train:", 1)[0]


def base_model_name() -> str:
    """What the SDK is told the base model is called (SERVED_MODEL_NAME)."""
    return served_model_name()


def tokenizer_id() -> str:
    """What the SDK loads the tokenizer from: the served name, except builtin-tiny's, which
    only exists here: its folder (the SDK then loads it offline on this machine)."""
    name, loaded = served_model_name(), services().backend.loaded
    return str(Path(loaded.path).resolve()) if name == BUILTIN_TINY else name


def check_base_model(name: str | None, field: str = "base_model") -> None:
    backend = services().backend
    folder = Path(backend.loaded.path)
    allowed = [*backend.base_names(), served_model_name(), *([str(folder.resolve())] if folder.is_dir() else [])]
    if name is not None and name not in allowed:
        raise BadRequestError(f"{field}: {name!r} is not served here; this server serves {served_model_name()!r}")


def live_adapter(model_id: str):
    """A trainable adapter of the caller's by id, or NotFoundError."""
    adapter = services().backend.adapters.get(model_id)
    check_owner(adapter.owner, adapters.not_found(model_id))
    if not adapter.trainable:
        raise NotFoundError(adapters.not_found(model_id))
    return adapter


def owned_session(session_id: str):
    """The caller's session; a missing one or another's is a 404. Sessions are durable, and
    their ids name the models and samplers made in them (and so folders on disk): an id the
    caller merely typed, even another tenant's public one, must never get that far."""
    session, missing = services().tinker.session(session_id), f"session {session_id!r} does not exist"
    if session is None:
        raise NotFoundError(missing)
    check_owner(session.owner, missing)
    return session
