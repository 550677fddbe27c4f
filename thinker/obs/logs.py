"""Structured logging: every record carries the request id and adapter id it belongs to.

Each HTTP request gets an id (the client's ``X-Request-Id`` when it is a sane token, else a
fresh one), sent back as the ``X-Request-Id`` header and attached to every record logged
while serving it. A future remembers the id of the request that submitted it
(``FutureRecord.meta["request_id"]``), and the worker running its job restores it, with the job's
``adapter_id`` and ``future_id``, so a job's records lead back to the request that caused it.

Two line formats (``LOG_FORMAT``): ``text``, the classic ``[time] LEVEL message`` with
``key=value`` fields appended, and ``json``, one object per line for log shippers. One
access line per HTTP request (logger ``thinker.access``) and one line per finished job
(``thinker.jobs``) carry their facts as fields.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import logging.handlers
import os
import queue
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, g, has_request_context, request

from thinker.store.futures import FutureRecord

FORMATS = ("text", "json")
TEXT_FORMAT = "[%(asctime)s] %(levelname)s %(message)s"

# What the record being logged belongs to; set per HTTP request and per running job.
request_id: ContextVar[str | None] = ContextVar("thinker_request_id", default=None)
adapter_id: ContextVar[str | None] = ContextVar("thinker_adapter_id", default=None)
future_id: ContextVar[str | None] = ContextVar("thinker_future_id", default=None)
_CONTEXT = (("request_id", request_id), ("adapter_id", adapter_id), ("future_id", future_id))

# A client's id is echoed into headers and log lines: only short plain tokens (UUIDs, hex,
# ULIDs) are taken, so it cannot smuggle line breaks, quotes or megabytes into either.
_SANE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
# Endpoints that clients and monitors poll: their access lines go to DEBUG, not INFO, so a
# long-polling SDK or a scraper does not drown the log.
_POLLS = {
    ("GET", "/healthz"),
    ("GET", "/api/v1/healthz"),
    ("GET", "/metrics"),
    ("POST", "/retrieve_future"),
    ("POST", "/api/v1/retrieve_future"),
    ("POST", "/api/v1/session_heartbeat"),
}

access_log = logging.getLogger("thinker.access")
job_log = logging.getLogger("thinker.jobs")


class ContextFilter(logging.Filter):
    """Copies the current request/adapter/future ids onto each record (unless the call
    passed its own through ``extra``). On the handler, so records of every logger get them."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _CONTEXT:
            if getattr(record, name, None) is None:
                setattr(record, name, var.get())
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's structured fields: ``extra={"fields": {...}}`` then the context ids."""
    fields = dict(getattr(record, "fields", None) or {})
    for name, _ in _CONTEXT:
        value = getattr(record, name, None)
        if value is not None:
            fields[name] = value
    return fields


def _text_value(value: Any) -> str:
    text = str(value)
    # Quoted (JSON string rules) when a plain split on spaces and '=' would misread it.
    return json.dumps(text) if not text or re.search(r'[\s="\\]', text) else text


class TextFormatter(logging.Formatter):
    """``[time] LEVEL message key=value ...``: the seed server's lines, plus the fields."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        line = super().formatMessage(record)
        fields = _fields(record)
        return line + "".join(f" {k}={_text_value(v)}" for k, v in fields.items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        line: dict[str, Any] = {
            "time": when.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _fields(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


def formatter(fmt: str) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"LOG_FORMAT must be one of {FORMATS}, got {fmt!r}")
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure(level: str, fmt: str | None = None) -> None:
    """Set up the root logger at ``level`` (LOG_LEVEL), writing ``fmt`` lines (LOG_FORMAT;
    None: read LOG_FORMAT from the environment, default text) to stderr."""
    fmt = (fmt or os.environ.get("LOG_FORMAT") or "text").lower()
    if fmt == "json":
        # Progress bars would break one-object-per-line; read once when huggingface_hub is
        # imported, which has not happened yet at start-up.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    global _listener
    if _listener is not None:
        _listener.stop()  # (configured again: the old thread writes what it holds, then ends)
    sink = logging.StreamHandler(sys.stderr)
    sink.setFormatter(formatter(fmt))
    # Records are queued where they are made and written by a thread of their own: a slow or
    # blocked stderr (a full pipe, a stalled terminal) then holds up no worker, HTTP thread or
    # the scheduler; only this thread waits.
    handler = _Enqueue(queue.SimpleQueue())
    handler.addFilter(ContextFilter())  # in the thread that made the record: its context vars
    handler.set_name("thinker")
    _listener = logging.handlers.QueueListener(handler.queue, sink)
    _listener.start()
    atexit.register(_listener.stop)  # what is queued at exit is still written
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)  # Python warnings become records too: one format per line


class _Enqueue(logging.handlers.QueueHandler):
    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """The record as made, its message fixed now (its arguments may change once queued);
        formatting is left to the writing thread's handler."""
        record.msg, record.args = record.getMessage(), None
        return record


def _sink_of(handler: logging.Handler) -> logging.Handler:
    """The handler that writes: ours queue records for the listener's."""
    if isinstance(handler, _Enqueue) and _listener is not None:
        return _listener.handlers[0]
    return handler


_listener: logging.handlers.QueueListener | None = None


@contextlib.contextmanager
def job_context(*jobs: FutureRecord) -> Iterator[None]:
    """Log as the job(s) of ``jobs``: the ids of the requests that submitted them, their
    adapters and futures (comma-joined for a fused pass of several)."""

    def joined(values: list[str | None]) -> str | None:
        return ",".join(dict.fromkeys(v for v in values if v)) or None

    values = (
        joined([job.meta.get("request_id") for job in jobs]),
        joined([job_adapter(job) for job in jobs]),
        joined([job.id for job in jobs]),
    )
    tokens = [var.set(value) for (_, var), value in zip(_CONTEXT, values, strict=True)]
    try:
        yield
    finally:
        for (_, var), token in zip(_CONTEXT, tokens, strict=True):
            var.reset(token)


def run_as(jobs: list[FutureRecord], fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with its log records naming ``jobs`` (see job_context)."""
    with job_context(*jobs):
        return fn(*args)


def job_adapter(future: FutureRecord) -> str | None:
    """The adapter a job ran on: its key, unless that is a key of its own (``solo_...``)."""
    return None if future.key.startswith("solo_") else future.key


def remember_request(future: FutureRecord) -> None:
    """Note the current request's id on a future being submitted (see job_context)."""
    if (rid := request_id.get()) is not None:
        future.meta.setdefault("request_id", rid)
    if has_request_context():  # what was asked, kept with the future (database.py stores it)
        future.meta.setdefault("endpoint", f"{request.method} {request.path}")


def log_job(future: FutureRecord) -> None:
    """The one line per finished job (an on_finish listener: runs on whichever thread
    finished it, so its ids are taken from the future, not from that thread)."""
    fields: dict[str, Any] = {"kind": future.kind, "status": future.status}
    if future.finished_at is not None:
        fields["duration_ms"] = round((future.finished_at - future.submitted_at) * 1000, 1)
    if future.error is not None:
        fields["error"] = future.error
        fields["error_type"] = future.error_type
    with job_context(future):
        job_log.info("job finished", extra={"fields": fields})


def install(app: Flask) -> None:
    """Give each HTTP request an id, visible in every log record made while serving it;
    log one access line per request and one line per finished job."""
    services = app.extensions["thinker"]
    services.pool.on_finish(log_job)
    for handler in logging.getLogger().handlers:
        if handler.name == "thinker":  # ours (configure()): follow this app's LOG_FORMAT
            _sink_of(handler).setFormatter(formatter(services.config.log_format.lower()))
            if services.config.log_format.lower() == "json" and "transformers" in sys.modules:
                # transformers writes its records through a handler of its own: route them through ours.
                from transformers.utils import logging as transformers_logging

                transformers_logging.disable_default_handler()
                transformers_logging.enable_propagation()

    @app.before_request
    def start_request() -> None:
        given = request.headers.get("X-Request-Id", "")
        g.request_id = given if _SANE_ID.fullmatch(given) else secrets.token_hex(8)
        g.request_id_token = request_id.set(g.request_id)
        g.request_started = time.perf_counter()

    @app.after_request
    def access_line(response: Response) -> Response:
        # Registered first, so it runs last: it sees the final status.
        if "request_id" not in g:
            return response
        response.headers["X-Request-Id"] = g.request_id
        duration_ms = round((time.perf_counter() - g.request_started) * 1000, 1)
        level = logging.DEBUG if (request.method, request.path) in _POLLS else logging.INFO
        # The path without its query string: signed download links carry their signature there.
        fields = {"method": request.method, "path": request.path, "status": response.status_code}
        access_log.log(level, "request", extra={"fields": fields | {"duration_ms": duration_ms}})
        return response

    @app.teardown_request
    def end_request(_exc: BaseException | None = None) -> None:
        token = g.pop("request_id_token", None)
        if token is not None:
            request_id.reset(token)
