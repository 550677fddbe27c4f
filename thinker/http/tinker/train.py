"""Tinker API: forward / forward_backward, optim_step, and saving and loading weights.

Every request to a model goes through its Sequencer, so it runs in the SDK's seq_id order
whatever order the POSTs arrive in. A request that fails validation still takes its turn
(its future fails), so a bad request never leaves a hole that stalls the ones after it.
"""

from __future__ import annotations

from collections.abc import Callable

from flask import request

from backend import AdamParams, FwdBwdRequest
from backend.lora.peft_files import to_tinker_names
from backend.train.losses import loss_config
from thinker.core.errors import BadRequestError, ThinkerError
from thinker.http.auth import owner
from thinker.http.services import check_adapter_quota, check_sequence_lengths
from thinker.http.state import write_checkpoint
from thinker.http.tinker import export, wire
from thinker.http.tinker.common import (
    FORWARD_BACKWARD,
    JSON,
    OPTIM,
    body,
    bp,
    check_base_model,
    live_adapter,
    owned_checkpoint,
    owned_session,
    services,
    session_of,
    start_plain,
    tokenizer_id,
    with_render,
)
from thinker.http.tinker.provenance import server_inputs
from thinker.http.tinker.schemas import AdamParamsBody, LoadWeightsBody, OptimStepBody, SaveWeightsBody
from thinker.http.tinker.sessions import Sampler
from thinker.store.checkpoints import TinkerPath
from thinker.store.futures import FutureRecord

SNAPSHOTS_KEPT = 8  # in-memory sampler snapshots kept per training run (older ones are released)


def _admit(model_id: str, seq_id: int | None, kind: str, start: Callable[[FutureRecord], None]) -> dict:
    future_id = services().tinker.sequencer(model_id).admit(seq_id, kind, start)
    return {"request_id": future_id, "model_id": model_id}


def _failing(error: ThinkerError) -> Callable[[FutureRecord], None]:
    pool = services().pool
    return lambda future: pool.fail(future, error)


@bp.post("/forward_backward")
def forward_backward():
    s = services()
    if "protobuf" not in (request.content_type or ""):
        raise BadRequestError("forward_backward takes a protobuf body (Content-Type: application/x-protobuf)")
    raw = wire.decompress(request.get_data(cache=False), request.content_encoding, s.config.max_body_bytes)
    message = wire.parse_forward_backward(raw)
    adapter = live_adapter(message.model_id)
    kind = "forward" if message.forward_only else "fwdbwd"
    try:
        # Sizes and tensor headers are checked before anything is decoded, and answered 400 at
        # once; the request still takes its turn (failed), so later seq_ids need not wait for it.
        if len(message.data) > s.config.max_examples_per_request:
            limit = s.config.max_examples_per_request
            raise BadRequestError(f"data: {len(message.data)} examples, over this server's limit of {limit}")
        check_sequence_lengths((n + 1 for n in wire.input_lengths(message)), "data")
        examples = wire.examples(message, wire.Bounds(s.config.max_target_k, s.config.max_request_elements))
    except ThinkerError as exc:
        _admit(adapter.id, message.seq_id, kind, _failing(exc))
        raise
    try:
        if not examples:
            raise BadRequestError("data: at least one example is needed")
        examples = server_inputs(message.loss_fn, message.data, examples, session_of(adapter.id), s.tinker.recorded)
        job = FwdBwdRequest(
            adapter.id,
            examples,
            message.loss_fn,
            loss_config(message.loss_fn, wire.loss_config(message)),
            reduction="sum",
            backward=not message.forward_only,
            return_logprobs=True,
        )
    except ThinkerError as exc:
        return _admit(adapter.id, message.seq_id, kind, _failing(exc))
    longest = max(ex.length for ex in job.examples)

    def start(future: FutureRecord) -> None:
        with_render(future, FORWARD_BACKWARD)
        s.pool.submit_fusable(adapter.id, kind, "fwdbwd", job, len(job.examples), longest, future=future)

    return _admit(adapter.id, message.seq_id, kind, start)


@bp.post("/optim_step")
def optim_step():
    s, req = services(), body(OptimStepBody)
    adapter = live_adapter(req.model_id)
    if req.optimizer_params is not None and req.adam_params is None:
        error = BadRequestError("optimizer_params: only AdamW (adam_params) is supported here")
        return _admit(adapter.id, req.seq_id, "optim_step", _failing(error))
    adam = AdamParams(**(req.adam_params or AdamParamsBody()).model_dump())

    def start(future: FutureRecord) -> None:
        with_render(future, OPTIM)
        s.pool.submit_fusable(adapter.id, "optim_step", "optim_step", (adapter.id, adam), 0, 0, future=future)

    return _admit(adapter.id, req.seq_id, "optim_step", start)


_RESULT_TYPES = {"weights": "save_weights", "sampler_weights": "save_weights_for_sampler"}


def _save(
    s, model_id: str, kind: str, name: str, optimizer: bool, req: SaveWeightsBody, overwrite: bool, finish=None
) -> dict:
    """Write a checkpoint of the model's current state (a job: it runs in the model's turn)."""
    path = write_checkpoint(
        s, model_id, kind, name, optimizer, ttl_s=req.ttl_seconds, user_metadata=req.user_metadata,
        overwrite=overwrite, finish=finish,
    )
    return {"path": str(path), "type": _RESULT_TYPES.get(kind, "save_weights_external")}


@bp.post("/save_weights")
def save_weights():
    s, req = services(), body(SaveWeightsBody)
    adapter = live_adapter(req.model_id)
    name = req.path or f"step-{adapter.step:06d}"
    job = lambda: _save(s, adapter.id, "weights", name, True, req, req.overwrite)  # noqa: E731
    return _admit(adapter.id, req.seq_id, "save_weights", start_plain(adapter.id, "save_weights", JSON, job))


@bp.post("/save_weights_external")
def save_weights_external():
    s, req = services(), body(SaveWeightsBody)
    adapter = live_adapter(req.model_id)
    # Checked now (a 400), and the files are encrypted before the checkpoint exists: no plaintext is kept.
    to = export.recipients(req.age_encryption_recipients) if req.age_encryption_recipients else None
    head = export.head_path(s.backend.loaded)

    def finish(folder) -> None:
        to_tinker_names(folder, head)  # Tinker's export names (what the cookbook's merge reads)
        if to is not None:
            export.encrypt_folder(folder, to)

    name = req.path or f"export-{adapter.step:06d}"
    job = lambda: _save(s, adapter.id, "external_weights", name, False, req, True, finish)  # noqa: E731
    return _admit(adapter.id, req.seq_id, "save_weights", start_plain(adapter.id, "save_weights", JSON, job))


@bp.post("/save_weights_for_sampler")
def save_weights_for_sampler():
    """With a name: a sampler_weights checkpoint on disk. Without (save_weights_and_get_
    sampling_client): a frozen in-memory snapshot, served by a new sampling session."""
    s, req = services(), body(SaveWeightsBody)
    adapter = live_adapter(req.model_id)
    if req.path is not None:
        job = lambda: _save(s, adapter.id, "sampler_weights", req.path, False, req, True)  # noqa: E731
        return _admit(adapter.id, req.seq_id, "save_weights", start_plain(adapter.id, "save_weights", JSON, job))
    if req.sampling_session_seq_id is None:
        raise BadRequestError("path or sampling_session_seq_id is required")
    sampler_id = f"{session_of(adapter.id)}:sample:{req.sampling_session_seq_id}"
    base_model = tokenizer_id()  # (the job runs outside the request)

    def snapshot() -> dict:
        if sampler_id not in s.tinker.samplers:
            s.backend.snapshot(adapter.id, sampler_id)
            sampler = Sampler(sampler_id, base_model, sampler_id, owner=adapter.owner)
            s.tinker.add_sampler(sampler, session_of(adapter.id))
            _release_old_snapshots(s, adapter.id, sampler_id)
        return {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}

    return _admit(adapter.id, req.seq_id, "save_weights", start_plain(adapter.id, "snapshot", JSON, snapshot))


def _release_old_snapshots(s, model_id: str, newest: str) -> None:
    """Free the oldest snapshots beyond SNAPSHOTS_KEPT, unless something still samples them."""
    snapshots = s.tinker.snapshots.setdefault(model_id, [])
    snapshots.append(newest)
    for old in snapshots[: max(0, len(snapshots) - SNAPSHOTS_KEPT)]:
        if s.backend.adapters.idle(old, 0.0):
            snapshots.remove(old)
            s.tinker.samplers[old].released = "newer snapshots replaced its in-memory snapshot"
            s.backend.remove_adapter(old)


@bp.post("/load_weights")
def load_weights():
    s, req = services(), body(LoadWeightsBody)
    path = TinkerPath.parse(req.path)
    if req.model_id is not None:  # load into an existing model, in its turn
        adapter = live_adapter(req.model_id)

        owned_checkpoint(path)

        def load() -> dict:
            s.checkpoints.get(path)
            s.backend.load_state(adapter.id, s.checkpoints.folder(path), req.optimizer)
            return {"path": str(path), "model_id": adapter.id, "type": "load_weights"}

        return _admit(adapter.id, req.seq_id, "load_weights", start_plain(adapter.id, "load_weights", JSON, load))
    if req.session_id is None or req.model_seq_id is None:
        raise BadRequestError("load_weights needs model_id, or session_id and model_seq_id")
    check_base_model(req.base_model)
    owned_session(req.session_id)
    owned_checkpoint(path)  # 404 now if it does not exist (or is not the caller's)
    if (req.session_id, req.model_seq_id) not in s.tinker.creations:
        check_adapter_quota()
    model_id, who = f"{req.session_id}:train:{req.model_seq_id}", owner()

    def create() -> dict:
        folder = s.checkpoints.folder(path)
        s.backend.create_from_checkpoint(folder, model_id, req.optimizer, trainable=True, owner=who)
        s.backend.adapters.get(model_id).user_metadata = dict(req.user_metadata or {})
        s.tinker.add_model(req.session_id, model_id)
        return {"path": str(path), "model_id": model_id, "type": "load_weights"}

    def submit() -> str:
        return with_render(s.pool.submit(None, "load_weights", create), JSON).id

    return {"request_id": s.tinker.once((req.session_id, req.model_seq_id), submit), "model_id": model_id}
