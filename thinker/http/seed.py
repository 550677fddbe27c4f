"""The seed API's routes: validate at the edge, hand work to the worker pool, answer with futures.

Training and adapter creation return ``{"request_id", "model_id"}`` at once; the result
is read with ``/retrieve_future`` (long-poll with ``timeout``). Sampling is synchronous
for the caller but still runs as a job, so it keeps its place in its adapter's queue.
"""

from __future__ import annotations

from flask import Blueprint, jsonify

from backend import AdamParams, FwdBwdRequest, SamplingParams
from backend.train.losses import CHAT_LOSS_FUNCTIONS
from thinker.core.errors import (
    BadRequestError,
    InsufficientStorageError,
    RequestFailedError,
    ServerError,
    StorageQuotaError,
)
from thinker.http.auth import check_owner, owner
from thinker.http.schemas import (
    AddLoraBody,
    FwdBwdBody,
    ModelIdBody,
    OptimStepBody,
    RetrieveFutureBody,
    SampleBody,
)
from thinker.http.services import (
    body,
    check_adapter_quota,
    check_limit,
    check_sampling_length,
    check_sequence_length,
    checkpoint_bytes,
    owned_model,
    public_served_name,
    services,
)
from thinker.store import futures
from thinker.store.futures import COMPLETED, FAILED, jsonable

bp = Blueprint("api", __name__)


@bp.get("/healthz")
def healthz():
    s = services()
    sampler = s.backend.sampler.stats() if s.backend.sampler else {}
    disk = {"disk_free_bytes": s.checkpoints.reserve.free_bytes(), "disk_full": s.checkpoints.reserve.full}
    info = {**s.backend.info(), "base_model": public_served_name(s)}  # SERVED_MODEL_NAME
    return {"status": "ok", **info, **s.pool.stats(), **sampler, **disk, "backend": s.backend.name}


@bp.get("/adapters")
def list_adapters():
    mine = [a for a in services().backend.adapters.all() if a.owner == owner()]
    return {"adapters": [a.describe() for a in mine]}


@bp.post("/add_lora")
def add_lora():
    s, req = services(), body(AddLoraBody)
    if req.base_model not in s.backend.base_names():
        raise BadRequestError(f"base_model: {req.base_model!r} is not served here; allowed: {s.backend.base_names()}")
    check_limit("rank", req.rank, s.config.max_lora_rank)
    check_adapter_quota()
    allowed = s.backend.allowed_targets()  # the output head too, as the engine allows
    if req.target_modules and not set(req.target_modules) <= set(allowed):
        unknown = sorted(set(req.target_modules) - set(allowed))
        why = s.backend.loaded.why_not_targets(unknown)
        raise BadRequestError(
            f"target_modules: {unknown} are not linear layers of this model; allowed: {allowed}"
            + (f" ({why})" if why else "")
        )
    who = owner()
    future = s.pool.submit(
        None, "add_lora", lambda: s.backend.add_lora(req.rank, req.alpha, req.target_modules, req.seed, owner=who)
    )
    return {"request_id": future.id, "model_id": req.base_model}


@bp.post("/fwdbwd")
def fwdbwd():
    s, req = services(), body(FwdBwdBody)
    adapter_id = owned_model(req.model_id, allow_base=False)
    if req.loss_fn not in CHAT_LOSS_FUNCTIONS:
        raise BadRequestError(f"loss_fn: {req.loss_fn!r} is not supported here; allowed: {list(CHAT_LOSS_FUNCTIONS)}")
    check_limit("data", len(req.data), s.config.max_examples_per_request)
    conversations = [[m.model_dump() for m in conv] for conv in req.data]
    examples = s.backend.render_conversations(conversations, check_length=check_sequence_length)
    job = FwdBwdRequest(adapter_id, examples, req.loss_fn)
    longest = max(ex.length for ex in examples)
    future = s.pool.submit_fusable(adapter_id, "fwdbwd", "fwdbwd", job, rows=len(examples), length=longest)
    return {"request_id": future.id, "model_id": adapter_id}


@bp.post("/optim_step")
def optim_step():
    s, req = services(), body(OptimStepBody)
    adapter_id = owned_model(req.model_id, allow_base=False)
    adam = AdamParams(**req.adam_params.model_dump())
    # Optimizer steps of several adapters that are ready together run as one job.
    future = s.pool.submit_fusable(adapter_id, "optim_step", "optim_step", (adapter_id, adam), rows=0, length=0)
    return {"request_id": future.id, "model_id": adapter_id}


@bp.post("/save_lora")
def save_lora():
    s, req = services(), body(ModelIdBody)
    adapter_id = owned_model(req.model_id, allow_base=False)
    adapter = s.backend.adapters.get(adapter_id)
    needed = checkpoint_bytes(adapter, optimizer=False)
    # Over quota (403) or a full disk (507): said now, and checked again when the job writes.
    s.checkpoints.check_room(adapter.owner, needed, s.backend.export_folder(adapter_id), f"adapter {adapter_id}")

    def save() -> dict:
        result: dict = {}

        def write(staged) -> None:
            result.update(s.backend.save_adapter(adapter_id, staged))

        s.checkpoints.save_export(adapter.owner, s.backend.export_folder(adapter_id), write, needed)
        return result

    future = s.pool.submit(adapter_id, "save_lora", save)
    return {"request_id": future.id, "model_id": adapter_id}


# A job that failed for lack of storage answers with that error's status (403 over quota,
# 507 disk full) instead of 500, so clients can tell "free space" from a server fault.
_FAILED_STATUS = {cls.__name__: cls.status_code for cls in (InsufficientStorageError, StorageQuotaError)}


@bp.post("/retrieve_future")
def retrieve_future():
    s, req = services(), body(RetrieveFutureBody)
    future = s.pool.get(req.request_id)
    check_owner(future.owner, futures.not_found(req.request_id))
    if req.timeout:
        future.wait(min(req.timeout, s.config.max_long_poll_s))
    if future.status == COMPLETED:
        return {"status": "completed", "request_id": future.id, "result": jsonable(future.result)}
    if future.status == FAILED:
        payload = {"status": "failed", "request_id": future.id, "error": future.error, "type": "RequestFailedError"}
        return jsonify(payload | {"cause": future.error_type}), _FAILED_STATUS.get(future.error_type, 500)
    return jsonify({"status": "pending", "request_id": future.id, "state": future.status}), 202


@bp.post("/api/v1/sample")
def sample():
    s, req = services(), body(SampleBody)
    adapter_id = owned_model(req.model_id, allow_base=True)
    p = req.sampling_params
    check_limit("prompts", len(req.prompts), s.config.max_prompts_per_request)
    check_limit("sampling_params.max_tokens", p.max_tokens, s.config.max_sample_tokens)
    stop = (p.stop,) if isinstance(p.stop, str) else tuple(p.stop or ())
    params = SamplingParams(p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, stop)
    prompts = s.backend.render_prompts(req.prompts)
    for i, prompt in enumerate(prompts):
        check_sampling_length(len(prompt), p.max_tokens, f"prompts[{i}]")
    # Base-model sampling touches no adapter state, so it need not queue behind anyone.
    # Sampling an adapter waits for the adapter's earlier jobs and holds its later ones
    # until its rows are done (it sees exactly the weights of its turn), but runs beside
    # the adapter's other samples (shared). With batching, the job joins the shared decode
    # loop; without, it samples as a batch of its own.
    if s.backend.sampler is not None:
        job = lambda: s.backend.sample_async(adapter_id, prompts, params)  # noqa: E731
    else:
        job = lambda: s.backend.sample(adapter_id, prompts, params)  # noqa: E731
    future = s.pool.submit(adapter_id, "sample", job, shared=True)
    if not future.wait(s.config.sample_timeout_s):
        raise ServerError(f"sampling did not finish within {s.config.sample_timeout_s:g}s")
    if future.status == FAILED:
        if future.error_type == "BadRequestError":
            raise BadRequestError(future.error)
        raise RequestFailedError(future.error)
    return future.result
