"""``model`` in an OpenAI request, and ``GET /models``.

A request's ``model`` is one of: the served base model (its public name, or any name the
Tinker API accepts for it), an adapter id the caller owns (sampled as it is now, in its
queue behind the training sent before), or a checkpoint path
``tinker://<run>/sampler_weights/<name>`` (or ``.../weights/...``) the caller owns, loaded
on demand as a frozen adapter, the way a Tinker sampling client loads it. Anything else,
another user's adapter included, is a 404 ``model_not_found``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from thinker.core.errors import NotFoundError
from thinker.http.auth import owner
from thinker.http.oai.common import ModelNotFoundError, bp, served_model_name, services
from thinker.http.tinker.common import base_model_name, owned_checkpoint
from thinker.http.tinker.sample import load_checkpoint
from thinker.store.checkpoints import TinkerPath

_STARTED = int(time.time())  # the base model's "created": when this server loaded it


@dataclass
class Target:
    """What a request samples from."""

    name: str  # echoed as the response's ``model``
    adapter_id: str | None  # None: the base model alone
    frozen: bool  # True: nothing trains it, so its requests need not queue behind anyone


def _missing(model: str) -> ModelNotFoundError:
    return ModelNotFoundError(f"model: {model!r} does not exist or you do not have access to it")


def _is_base(model: str) -> bool:
    names = {served_model_name(), base_model_name(), services().backend.loaded.public_name}
    return model in names | set(services().backend.base_names())


def _owned_adapter(model: str):
    """The caller's adapter of that id; None for another's, exactly as for a missing one."""
    adapter = services().backend.adapters.find(model)
    return adapter if adapter is not None and adapter.owner == owner() else None


def resolve(model: str) -> Target:
    """The base model, an adapter or a checkpoint (loaded now if it is not in memory)."""
    if _is_base(model):
        return Target(model, None, frozen=True)
    if model.startswith("tinker://"):
        live = model.removeprefix("tinker://")
        if "/" not in live:  # tinker://<model id>: the adapter as it is now
            return _adapter_target(model, live)
        try:
            adapter_id = load_checkpoint(TinkerPath.parse(model, "model"))
        except NotFoundError:
            raise _missing(model) from None
        return Target(model, adapter_id, frozen=True)
    return _adapter_target(model, model)


def _adapter_target(model: str, adapter_id: str) -> Target:
    adapter = _owned_adapter(adapter_id)
    if adapter is None:
        raise _missing(model)
    return Target(model, adapter.id, frozen=not adapter.trainable)


def _entry(model_id: str, created: float, owned_by: str) -> dict:
    return {"id": model_id, "object": "model", "created": int(created), "owned_by": owned_by}


@bp.get("/models")
def list_models():
    """The base model and the caller's adapters (checkpoints are valid ``model``s too, but
    are listed by the Tinker API's /training_runs, not here)."""
    me = owner()
    data = [_entry(served_model_name(), _STARTED, "thinker")]
    adapters = [a for a in services().backend.adapters.all() if a.owner == me and a.trainable]
    data += [_entry(a.id, a.created_at, "you") for a in sorted(adapters, key=lambda a: a.created_at)]
    return {"object": "list", "data": data}


@bp.get("/models/<path:model_id>")
def get_model(model_id: str):
    if _is_base(model_id):
        return _entry(model_id, _STARTED, "thinker")
    if model_id.startswith("tinker://") and "/" in model_id.removeprefix("tinker://"):
        try:
            info = owned_checkpoint(TinkerPath.parse(model_id, "model"))
        except NotFoundError:
            raise _missing(model_id) from None
        return _entry(model_id, info.created_at, "you")
    adapter = _owned_adapter(model_id.removeprefix("tinker://"))
    if adapter is None:
        raise _missing(model_id)
    return _entry(model_id, adapter.created_at, "you")
