"""Tinker API, REST side: training runs, checkpoints, sessions, and checkpoint downloads.

Downloads: ``GET .../checkpoints/<kind>/<name>/archive`` returns the PEFT adapter as a
.tar.gz; the SDK's own download flow (``tinker checkpoint download``) asks for
``external_weights_urls`` and fetches each file from a signed, expiring URL without
credentials, which ``/api/v1/files/...`` serves.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from flask import Response, request, send_file, url_for

from thinker.core.errors import BadRequestError, NotFoundError
from thinker.http.auth import owner
from thinker.http.tinker import export
from thinker.http.tinker.common import base_model_name, body, bp, iso, owned_checkpoint, owned_session, services
from thinker.http.tinker.schemas import TtlBody
from thinker.store.checkpoints import KINDS, CheckpointInfo, TinkerPath

URL_LIFETIME_S = 3600
_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _page() -> tuple[int, int]:
    try:
        limit = min(max(int(request.args.get("limit", 20)), 1), 1000)
        offset = max(int(request.args.get("offset", 0)), 0)
    except ValueError:
        raise BadRequestError("limit and offset must be integers") from None
    return limit, offset


def _runs() -> dict[str, dict]:
    """Every training run: live trainable adapters, and runs known only from checkpoints."""
    s, me = services(), owner()
    checkpoints = [c for c in s.checkpoints.list() if c.owner == me]
    runs: dict[str, dict] = {}
    for adapter in s.backend.adapters.all():
        if adapter.trainable and adapter.owner == me:
            runs[adapter.id] = _run(adapter.id, adapter.rank, adapter.last_used_at, adapter.user_metadata, checkpoints)
    for info in checkpoints:
        if info.run_id not in runs:
            runs[info.run_id] = _run(info.run_id, info.rank, info.created_at, {}, checkpoints)
    return runs


def _run(run_id: str, rank: int, last_used: float, metadata: dict, checkpoints: list[CheckpointInfo]) -> dict:
    own = [c for c in checkpoints if c.run_id == run_id]
    last = {kind: next((c.describe() for c in reversed(own) if c.kind == kind), None) for kind in KINDS}
    return {
        "training_run_id": run_id,
        "base_model": base_model_name(),
        "model_owner": "local",  # one owner until API keys arrive
        "is_lora": True,
        "corrupted": False,
        "lora_rank": rank,
        "last_request_time": iso(max([last_used] + [c.created_at for c in own])),
        "last_checkpoint": last["weights"],
        "last_sampler_checkpoint": last["sampler_weights"],
        "user_metadata": metadata or None,
    }


@bp.get("/training_runs")
def list_training_runs():
    limit, offset = _page()
    runs = sorted(_runs().values(), key=lambda r: r["last_request_time"], reverse=True)
    cursor = {"offset": offset, "limit": limit, "total_count": len(runs)}
    return {"training_runs": runs[offset : offset + limit], "cursor": cursor}


@bp.get("/training_runs/<run_id>")
def get_training_run(run_id: str):
    run = _runs().get(run_id)
    if run is None:
        raise NotFoundError(f"training run {run_id!r} does not exist")
    return run


@bp.get("/training_runs/<run_id>/checkpoints")
def list_run_checkpoints(run_id: str):
    return {"checkpoints": [c.describe() for c in services().checkpoints.list(run_id) if c.owner == owner()]}


@bp.get("/checkpoints")
def list_user_checkpoints():
    limit, offset = _page()
    checkpoints = [c for c in reversed(services().checkpoints.list()) if c.owner == owner()]  # newest first
    cursor = {"offset": offset, "limit": limit, "total_count": len(checkpoints)}
    return {"checkpoints": [c.describe() for c in checkpoints[offset : offset + limit]], "cursor": cursor}


@bp.route("/training_runs/<run_id>/checkpoints/<path:rest>", methods=["GET", "POST", "PUT", "DELETE"])
def checkpoint_operation(run_id: str, rest: str):
    """``<kind>/<name>`` (DELETE), ``<kind>/<name>/publish`` (POST, DELETE), ``.../ttl``
    (PUT), ``.../external_weights_urls`` and ``.../archive`` (GET). Checkpoint ids hold a
    slash, and the SDK sends them unescaped, hence one route."""
    s = services()
    parts = rest.split("/")
    if len(parts) not in (2, 3):
        raise NotFoundError(f"no such checkpoint operation: {rest!r}")
    path = TinkerPath.parse(f"tinker://{run_id}/{parts[0]}/{parts[1]}")
    owned_checkpoint(path)
    action = (request.method, parts[2] if len(parts) == 3 else "")
    if action == ("DELETE", ""):
        s.checkpoints.delete(path)
        return {}
    if action == ("GET", ""):
        return s.checkpoints.get(path).describe()
    if action in {("POST", "publish"), ("DELETE", "publish")}:
        s.checkpoints.update(path, public=request.method == "POST")  # idempotent: no 409 either way
        return {}
    if action == ("PUT", "ttl"):
        ttl = body(TtlBody).ttl_seconds
        s.checkpoints.update(path, expires_at=time.time() + ttl if ttl else None)
        return {}
    if action == ("GET", "archive"):
        if export.served_names(s.checkpoints.folder(path), _FILES) != list(_FILES):
            raise BadRequestError(f"{path} is an encrypted export: fetch its .age files (external_weights_urls)")
        archive = s.checkpoints.archive(path)
        filename = f"{path.run_id}-{path.kind}-{path.name}.tar.gz".replace(":", "_")
        return Response(
            archive,
            content_type="application/gzip",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )
    if action == ("GET", "external_weights_urls"):
        info = s.checkpoints.get(path)
        expires = int(time.time()) + URL_LIFETIME_S
        urls = {
            name: url_for(
                "tinker.download_file", run_id=path.run_id, kind=path.kind, name=path.name, filename=name,
                expires=expires, signature=_sign(path, info, name, expires), _external=True,
            )
            for name in export.served_names(s.checkpoints.folder(path), _FILES)
        }
        return {"urls": urls, "expires": iso(expires)}
    raise NotFoundError(f"no such checkpoint operation: {request.method} {rest!r}")


def _sign(path: TinkerPath, info: CheckpointInfo, filename: str, expires: int) -> str:
    # The save's time is signed too: a link stops working once its checkpoint is saved
    # again under the same name, rather than handing out weights its holder never saw.
    message = f"{path}|{info.created_at:.6f}|{filename}|{expires}".encode()
    return hmac.new(services().download_secret, message, hashlib.sha256).hexdigest()


@bp.get("/files/<run_id>/<kind>/<name>/<filename>")
def download_file(run_id: str, kind: str, name: str, filename: str):
    """One file of a checkpoint, for whoever holds a URL signed by external_weights_urls."""
    invalid = "this download link is invalid or expired"
    path = TinkerPath.parse(f"tinker://{run_id}/{kind}/{name}")
    try:
        expires = int(request.args.get("expires", "0"))
    except ValueError:
        expires = 0
    if filename.removesuffix(export.AGE_SUFFIX) not in _FILES or expires < time.time():
        raise NotFoundError(invalid)
    try:
        info = services().checkpoints.get(path)
    except NotFoundError:
        raise NotFoundError(invalid) from None  # (the same answer: an unsigned caller learns nothing)
    # Bytes, not str: compare_digest refuses non-ASCII strings with a TypeError (a 500).
    signature = request.args.get("signature", "").encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(signature, _sign(path, info, filename, expires).encode()):
        raise NotFoundError(invalid)
    file = services().checkpoints.folder(path) / filename
    if not file.is_file():  # (a plain name of an encrypted export, or the other way round)
        raise NotFoundError(invalid)
    return send_file(file, as_attachment=True, download_name=filename)


@bp.get("/sessions")
def list_sessions():
    limit, offset = _page()
    mine = [x for x in services().tinker.sessions.values() if x.owner == owner()]
    ids = [x.id for x in sorted(mine, key=lambda x: x.created_at, reverse=True)]
    return {"sessions": ids[offset : offset + limit]}


@bp.get("/sessions/<session_id>")
def get_session(session_id: str):
    session = owned_session(session_id)
    return {
        "training_run_ids": list(session.models),
        "sampler_ids": list(session.samplers),
        "user_metadata": session.user_metadata or None,
    }
