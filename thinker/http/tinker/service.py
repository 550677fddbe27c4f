"""Tinker API: client configuration, sessions, model creation, model info and futures."""

from __future__ import annotations

import time

from flask import Response, jsonify, request

from backend.lora.layer import short_name
from thinker.core.errors import BadRequestError
from thinker.http.auth import check_owner, owner
from thinker.http.services import check_adapter_quota
from thinker.http.tinker import wire
from thinker.http.tinker.common import (
    FORWARD_BACKWARD,
    LORA_ALPHA,
    OPTIM,
    SAMPLE,
    base_model_name,
    body,
    bp,
    check_base_model,
    live_adapter,
    owned_checkpoint,
    owned_session,
    services,
    tokenizer_id,
    with_render,
)
from thinker.http.tinker.schemas import (
    CreateModelBody,
    CreateSessionBody,
    ModelIdBody,
    RetrieveFutureBody,
    SessionIdBody,
    WeightsInfoBody,
)
from thinker.store import futures
from thinker.store.checkpoints import TinkerPath
from thinker.store.futures import COMPLETED, FAILED

USER_ERRORS = {"BadRequestError", "NotFoundError", "ConflictError", "PayloadTooLargeError", "StorageQuotaError"}


@bp.post("/client/config")
def client_config():
    s = services()
    return {
        "pjwt_auth_enabled": False,
        "use_pyqwest_transport": False,  # plain httpx: simple and debuggable against a local server
        "parallel_fwdbwd_chunks": True,  # chunks may arrive out of order: Sequencer reorders them
        "proto_compress_fwdbwd": False,
        "fwdbwd_max_chunk_len": s.config.max_examples_per_request,
        "sample_use_retrieve_futures": False,
        "sample_join_sampling_session": False,
        "custom_loss_server_side": False,
    }


@bp.post("/client/dynamic_config")
def client_dynamic_config():
    return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}


@bp.post("/create_session")
def create_session():
    req = body(CreateSessionBody)
    session = services().tinker.new_session(req.tags, req.user_metadata, owner())
    return {"session_id": session.id}


@bp.post("/session_heartbeat")
def session_heartbeat():
    owned_session(body(SessionIdBody).session_id).last_heartbeat = time.time()
    return {}


@bp.post("/sessions/<path:session_id>/finish")
def finish_session(session_id: str):
    owned_session(session_id).finished = True
    return {}


@bp.post("/telemetry")
def telemetry():
    return {"status": "accepted"}  # clients report their own errors here; nothing to keep yet


@bp.get("/get_server_capabilities")
def server_capabilities():
    loaded = services().backend.loaded
    model = {"max_context_length": loaded.context_length, "trainable": True, "sampleable": True}
    return {"supported_models": [{"model_name": base_model_name(), **model}]}


@bp.get("/healthz")
def healthz():
    return {"status": "ok"}


def _layer_groups() -> dict[str, str]:
    """Tinker's switch for each LoRA-able layer's short name: "unembed", "attn" or "mlp"."""
    loaded = services().backend.loaded
    groups = {}
    for path in loaded.lora_layers:
        name = short_name(path)
        if name == loaded.head_module:
            groups[name] = "unembed"
        else:
            groups[name] = "attn" if "attn" in path or "attention" in path else "mlp"
    return groups


def lora_targets(train_mlp: bool, train_attn: bool, train_unembed: bool) -> list[str]:
    """Short names of the layers to put LoRA on, from Tinker's three switches."""
    wanted = {"mlp": train_mlp, "attn": train_attn, "unembed": train_unembed}
    groups = _layer_groups()
    experts = services().backend.loaded.fused_experts
    if train_mlp and experts and "mlp" not in groups.values():
        # The MLP is all fused experts: train_mlp would silently train nothing there.
        raise BadRequestError(
            f"lora_config.train_mlp: this model's MLP is fused MoE expert weights ({experts[0]}, ...) in a layout "
            "the LoRA core does not wrap; pass train_mlp=False (see docs/model-families.md)"
        )
    chosen = sorted(name for name, group in groups.items() if wanted[group])
    if not chosen:
        raise BadRequestError("lora_config: train_mlp, train_attn and train_unembed select no layer of this model")
    return chosen


@bp.post("/create_model")
def create_model():
    s, req = services(), body(CreateModelBody)
    owned_session(req.session_id)
    check_base_model(req.base_model)
    if req.optimizer_config.type != "adamw":
        raise BadRequestError(f"optimizer_config.type: {req.optimizer_config.type!r} is not supported; use adamw")
    if req.lora_config.rank > s.config.max_lora_rank:
        raise BadRequestError(f"lora_config.rank: {req.lora_config.rank} is over the limit of {s.config.max_lora_rank}")
    if (req.session_id, req.model_seq_id) not in s.tinker.creations:
        check_adapter_quota()  # (a resend of a create already accepted is not a new adapter)
    cfg = req.lora_config
    targets = lora_targets(cfg.train_mlp, cfg.train_attn, cfg.train_unembed)
    model_id, who = f"{req.session_id}:train:{req.model_seq_id}", owner()

    def create() -> dict:
        adapter = s.backend.add_lora(cfg.rank, LORA_ALPHA, targets, cfg.seed, adapter_id=model_id, owner=who)
        s.backend.adapters.get(model_id).user_metadata = dict(req.user_metadata or {})
        s.tinker.add_model(req.session_id, model_id)
        return {"model_id": adapter["model_id"], "type": "create_model"}

    future_id = s.tinker.once(
        (req.session_id, req.model_seq_id), lambda: with_render(s.pool.submit(None, "create_model", create), "json").id
    )
    return {"request_id": future_id, "model_id": model_id}


@bp.post("/get_info")
def get_info():
    s = services()
    adapter = live_adapter(body(ModelIdBody).model_id)
    loaded = s.backend.loaded
    name, tokenizer = base_model_name(), tokenizer_id()
    return {
        "type": "get_info",
        "model_id": adapter.id,
        "model_data": {
            "arch": getattr(loaded.model.config, "model_type", None),
            "model_name": name,
            "tokenizer_id": tokenizer if ":" not in tokenizer else None,
        },
        "optimizer_config": {"type": "adamw"},
        "is_lora": True,
        "lora_rank": adapter.rank,
        "model_name": name,
    }


@bp.post("/weights_info")
def weights_info():
    path = TinkerPath.parse(body(WeightsInfoBody).tinker_path, "tinker_path")
    info = owned_checkpoint(path)
    groups = {group for name, group in _layer_groups().items() if name in info.target_modules}
    return {
        "base_model": base_model_name() if info.base_model == services().backend.loaded.name else info.base_model,
        "is_lora": True,
        "lora_rank": info.rank,
        "train_unembed": "unembed" in groups,
        "train_attn": "attn" in groups,
        "train_mlp": "mlp" in groups,
        "optimizer_config": {"type": "adamw"},
    }


@bp.post("/retrieve_future")
def retrieve_future():
    """Long-poll: answer when the result exists or after ~25 s with "try_again" (the SDK polls
    again at once, and gives up on a request after 45 s)."""
    s, req = services(), body(RetrieveFutureBody)
    future = s.pool.get(req.request_id)
    check_owner(future.owner, futures.not_found(req.request_id))
    client_timeout = _float_header("x-stainless-read-timeout", 45.0)
    future.wait(max(0.0, min(25.0, s.config.max_long_poll_s, client_timeout - 5.0)))
    if future.status == FAILED:
        category = "user" if future.error_type in USER_ERRORS else "server"
        return {"error": future.error, "category": category, "request_id": future.id}
    if future.status != COMPLETED:
        return {"type": "try_again", "request_id": future.id, "queue_state": "active"}
    render = future.meta.get("render")
    if render == FORWARD_BACKWARD:
        result = future.result
        payload = wire.forward_backward_output(result["logprobs"], {"loss:sum": result["loss"]})
        return Response(payload, content_type=wire.PROTOBUF)
    if render == SAMPLE:
        return Response(wire.sample_response(future.result), content_type=wire.PROTOBUF)
    if render == OPTIM:
        result = future.result
        metrics = {"grad_norm:mean": result["grad_norm"], "learning_rate:mean": result["learning_rate"]}
        return {"metrics": metrics, "type": "optim_step"}
    if not isinstance(future.result, dict):
        raise BadRequestError(f"request_id {future.id!r} is not a Tinker API request")
    return jsonify(future.result)


def _float_header(name: str, default: float) -> float:
    try:
        return float(request.headers.get(name, default))
    except ValueError:
        return default
