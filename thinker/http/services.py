"""What the routes share: the ``Services`` attached to the app, and the checks every API
makes at the edge (JSON body, ownership, quotas, sequence lengths).

The seed API (``seed``), the state routes (``state``) and the Tinker API (``tinker/``) all
import from here, never from each other.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import current_app, request

from backend import HFBackend
from backend.lora import adapters
from thinker.core.config import BUILTIN_TINY, Config
from thinker.core.errors import BadRequestError
from thinker.http.auth import check_owner, owner
from thinker.http.schemas import parse_body
from thinker.http.tinker.sessions import TinkerState
from thinker.store import checkpoints
from thinker.store.checkpoints import CheckpointInfo, CheckpointStore, TinkerPath
from thinker.store.database import Database
from worker_pool import WorkerPool


@dataclass
class Services:
    """What the routes share, attached to the app as ``app.extensions["thinker"]``."""

    config: Config
    backend: HFBackend
    pool: WorkerPool
    checkpoints: CheckpointStore
    tinker: TinkerState  # sessions, samplers and request order of the Tinker API
    download_secret: bytes  # signs checkpoint download links
    database: Database  # futures and idempotency keys, durable across restarts
    autosaver: Any = None  # api_state.Autosaver when AUTOSAVE_EVERY_STEPS is set


def services() -> Services:
    return current_app.extensions["thinker"]


def served_model_name(s: Services | None = None) -> str:
    """The base model's name on every API (SERVED_MODEL_NAME, docs/configuration.md): what the
    Tinker endpoints report as model_name/tokenizer_id and accept as base_model, so the SDK and
    the cookbook pick the tokenizer and chat renderer of the model it really is."""
    s = s or services()
    loaded = s.backend.loaded
    return s.config.served_model_name or _default_served_name(loaded.name, loaded.path)


def public_served_name(s: Services | None = None) -> str:
    """``served_model_name`` where anyone may read it (/healthz): a folder's name, never its path."""
    name = served_model_name(s)
    return os.path.basename(os.path.normpath(name)) if os.path.isabs(name) else name


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@functools.lru_cache(maxsize=8)
def _default_served_name(name: str, path: str) -> str:
    """The hub id; a local folder's config.json ``_name_or_path`` when that is a hub id (a
    folder copied from the hub), else the folder's absolute path, which the SDK's tokenizer
    loading resolves on this machine (builtin-tiny keeps its own name)."""
    folder = Path(path)
    if not folder.is_dir():
        return name
    try:
        origin = json.loads((folder / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        origin = None
    if isinstance(origin, str) and _HUB_ID.fullmatch(origin) and not Path(origin).exists():
        return origin
    return name if name == BUILTIN_TINY else str(folder.resolve())


def body(schema):
    try:
        decoded = json.loads(request.get_data(cache=False) or b"null")
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise BadRequestError(f"the request body is not valid JSON ({type(exc).__name__})") from None
    return parse_body(schema, decoded)


def owned_model(model_id: str, allow_base: bool) -> str | None:
    """resolve_model, for adapters the caller owns only (another's is a 404, like a missing one)."""
    adapter_id = services().backend.resolve_model(model_id, allow_base)
    if adapter_id is not None:
        check_owner(services().backend.adapters.get(adapter_id).owner, adapters.not_found(adapter_id))
    return adapter_id


def check_limit(field: str, value: int, limit: int) -> None:
    if value > limit:
        raise BadRequestError(f"{field}: {value} is over this server's limit of {limit}")


def owned_checkpoint(path: TinkerPath) -> CheckpointInfo:
    """A checkpoint of the caller's (another's is a 404, like a missing one)."""
    info = services().checkpoints.get(path)
    check_owner(info.owner, checkpoints.not_found(path))
    return info


def check_adapter_quota() -> None:
    """400 when the caller already holds MAX_ADAPTERS_PER_USER trainable adapters."""
    s, me = services(), owner()
    held = sum(1 for a in s.backend.adapters.all() if a.owner == me and a.trainable)
    if held >= s.config.max_adapters_per_user:
        limit = s.config.max_adapters_per_user
        raise BadRequestError(f"adapters: you hold {held}, the limit per user (MAX_ADAPTERS_PER_USER) is {limit}")


def check_sequence_length(length: int, field: str) -> None:
    """400 for a training sequence (model input + its last target, ``length`` tokens) over
    MAX_SEQUENCE_TOKENS or the model's context window: refused here, not failed in a job."""
    s = services()
    limit, window = s.config.max_sequence_tokens, s.backend.loaded.context_length
    if length > limit:
        raise BadRequestError(f"{field}: {length} tokens, over this server's limit of {limit} per sequence")
    if length - 1 > window:  # the model reads all but the last token
        raise BadRequestError(
            f"{field}: the sequence has {length} tokens, longer than the model's context window of {window}"
        )


def check_sequence_lengths(lengths, field: str = "data") -> None:
    for i, length in enumerate(lengths):
        check_sequence_length(length, f"{field}[{i}]")


def check_sampling_length(prompt_tokens: int, max_tokens: int, field: str) -> None:
    """400 when a prompt and the tokens asked for do not fit in the model's context window."""
    window = services().backend.loaded.context_length
    if prompt_tokens + max_tokens > window:
        raise BadRequestError(
            f"{field}: {prompt_tokens} prompt tokens + max_tokens {max_tokens} exceed the model's "
            f"context window of {window}"
        )

def checkpoint_bytes(adapter, optimizer: bool) -> int:
    """About how many bytes a checkpoint of ``adapter`` takes: its LoRA weights, twice that
    again for Adam's two moments once it has stepped, and the small files."""
    weights = sum(p.numel() * p.element_size() for p in adapter.params)
    moments = 2 * weights if optimizer and getattr(adapter.optimizer, "state", None) else 0
    return weights + moments + 64 * 1024
