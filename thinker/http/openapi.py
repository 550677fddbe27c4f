"""``GET /openapi.json``: an OpenAPI 3 document of every endpoint, built from the same
pydantic models that validate the bodies (so it cannot drift from what the server accepts).
Limits that come from the configuration (ranks, tokens, examples) are written in as maxima."""

from __future__ import annotations

from flask import Blueprint, current_app
from pydantic.json_schema import models_json_schema

from thinker.http import schemas
from thinker.http.oai import schemas as oai
from thinker.http.tinker import schemas as tinker

bp = Blueprint("openapi", __name__)

JSON_OBJECT = {"type": "object"}
ERRORS = ("400", "401", "403", "404", "409", "413", "429", "503", "507")  # 403/507: quota/disk full, 503: draining
# (method, path, body model or None, success statuses, response media types)
_JSON = ("application/json",)
_PROTOBUF = "application/x-protobuf"
_ID = {"type": "string", "pattern": "^[A-Za-z0-9._:-]+$"}
_BINARY = {"type": "string", "format": "binary"}
_JSON_OR_EVENTS = ("application/json", "text/event-stream")  # stream: true answers with server-sent events
_OPERATIONS = [
    ("get", "/healthz", None, ("200",), _JSON),
    ("get", "/metrics", None, ("200",), ("text/plain",)),
    ("get", "/adapters", None, ("200",), _JSON),
    ("post", "/add_lora", schemas.AddLoraBody, ("200",), _JSON),
    ("post", "/fwdbwd", schemas.FwdBwdBody, ("200",), _JSON),
    ("post", "/optim_step", schemas.OptimStepBody, ("200",), _JSON),
    ("post", "/save_lora", schemas.ModelIdBody, ("200",), _JSON),
    ("post", "/retrieve_future", schemas.RetrieveFutureBody, ("200", "202", "500"), _JSON),
    ("post", "/api/v1/sample", schemas.SampleBody, ("200",), _JSON),
    ("post", "/save_state", schemas.SaveStateBody, ("200",), _JSON),
    ("post", "/load_state", schemas.LoadStateBody, ("200",), _JSON),
    ("get", "/checkpoints", None, ("200",), _JSON),
    ("post", "/delete_lora", schemas.ModelIdBody, ("200",), _JSON),
    ("get", "/openapi.json", None, ("200",), _JSON),
    ("get", "/", None, ("200",), ("text/html",)),
    ("get", "/dashboard/state", None, ("200",), _JSON),
    ("get", "/dashboard/assets/{name}", None, ("200",), ("text/javascript", "text/css", "image/svg+xml")),
    ("post", "/api/v1/client/config", None, ("200",), _JSON),
    ("post", "/api/v1/client/dynamic_config", None, ("200",), _JSON),
    ("post", "/api/v1/create_session", tinker.CreateSessionBody, ("200",), _JSON),
    ("post", "/api/v1/session_heartbeat", tinker.SessionIdBody, ("200",), _JSON),
    ("post", "/api/v1/sessions/{session_id}/finish", None, ("200",), _JSON),
    ("post", "/api/v1/telemetry", None, ("200",), _JSON),
    ("get", "/api/v1/get_server_capabilities", None, ("200",), _JSON),
    ("get", "/api/v1/healthz", None, ("200",), _JSON),
    ("post", "/api/v1/create_model", tinker.CreateModelBody, ("200",), _JSON),
    ("post", "/api/v1/get_info", tinker.ModelIdBody, ("200",), _JSON),
    ("post", "/api/v1/weights_info", tinker.WeightsInfoBody, ("200",), _JSON),
    ("post", "/api/v1/retrieve_future", tinker.RetrieveFutureBody, ("200",), ("application/json", _PROTOBUF)),
    ("post", "/api/v1/forward_backward", "protobuf", ("200",), _JSON),
    ("post", "/api/v1/optim_step", tinker.OptimStepBody, ("200",), _JSON),
    ("post", "/api/v1/save_weights", tinker.SaveWeightsBody, ("200",), _JSON),
    ("post", "/api/v1/save_weights_external", tinker.SaveWeightsBody, ("200",), _JSON),
    ("post", "/api/v1/save_weights_for_sampler", tinker.SaveWeightsBody, ("200",), _JSON),
    ("post", "/api/v1/load_weights", tinker.LoadWeightsBody, ("200",), _JSON),
    ("post", "/api/v1/create_sampling_session", tinker.CreateSamplingSessionBody, ("200",), _JSON),
    ("get", "/api/v1/samplers/{sampler_id}", None, ("200",), _JSON),
    ("post", "/api/v1/asample", tinker.SampleBody, ("200",), _JSON),
    ("get", "/api/v1/training_runs", None, ("200",), _JSON),
    ("get", "/api/v1/training_runs/{run_id}", None, ("200",), _JSON),
    ("get", "/api/v1/training_runs/{run_id}/checkpoints", None, ("200",), _JSON),
    ("get", "/api/v1/checkpoints", None, ("200",), _JSON),
    ("get", "/api/v1/training_runs/{run_id}/checkpoints/{kind}/{name}", None, ("200",), _JSON),
    ("delete", "/api/v1/training_runs/{run_id}/checkpoints/{kind}/{name}", None, ("200",), _JSON),
    ("post", "/api/v1/training_runs/{run_id}/checkpoints/{kind}/{name}/publish", None, ("200",), _JSON),
    ("delete", "/api/v1/training_runs/{run_id}/checkpoints/{kind}/{name}/publish", None, ("200",), _JSON),
    ("put", "/api/v1/training_runs/{run_id}/checkpoints/{kind}/{name}/ttl", tinker.TtlBody, ("200",), _JSON),
    ("get", "/api/v1/training_runs/{run_id}/checkpoints/{kind}/{name}/archive", None, ("200",), ("application/gzip",)),
    ("get", "/api/v1/training_runs/{run_id}/checkpoints/{kind}/{name}/external_weights_urls", None, ("200",), _JSON),
    ("get", "/api/v1/files/{run_id}/{kind}/{name}/{filename}", None, ("200",), ("application/octet-stream",)),
    ("get", "/api/v1/sessions", None, ("200",), _JSON),
    ("get", "/api/v1/sessions/{session_id}", None, ("200",), _JSON),
    ("post", "/oai/api/v1/chat/completions", oai.ChatCompletionBody, ("200",), _JSON_OR_EVENTS),
    ("post", "/oai/api/v1/completions", oai.CompletionBody, ("200",), _JSON_OR_EVENTS),
    ("get", "/oai/api/v1/models", None, ("200",), _JSON),
    ("get", "/oai/api/v1/models/{model_id}", None, ("200",), _JSON),
]

# Optional query parameters, by path.
_PAGE = {"limit": {"type": "integer", "minimum": 1, "maximum": 1000}, "offset": {"type": "integer", "minimum": 0}}
_QUERY: dict[str, dict[str, dict]] = {
    "/dashboard/state": {
        "limit": {"type": "integer", "minimum": 1, "maximum": 200},  # adapters, most recently active first
        "since": {"type": "number", "minimum": 0},  # only loss points newer than this (server time)
    },
    "/api/v1/training_runs": _PAGE,
    "/api/v1/checkpoints": _PAGE,
    "/api/v1/sessions": _PAGE,
    "/api/v1/files/{run_id}/{kind}/{name}/{filename}": {
        "expires": {"type": "integer"},  # the signed link's expiry and signature
        "signature": {"type": "string"},
    },
}


def document(config) -> dict:
    models = sorted({op[2] for op in _OPERATIONS if isinstance(op[2], type)}, key=lambda m: (m.__module__, m.__name__))
    refs, defs = models_json_schema(
        [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
    )
    components = dict(defs.get("$defs", {}))
    _apply_limits(components, config)
    paths: dict[str, dict] = {}
    for method, path, body, statuses, media in _OPERATIONS:
        operation: dict = {"responses": _responses(statuses, media), "operationId": f"{method}_{path}"}
        params = [p.strip("{}") for p in path.split("/") if p.startswith("{")]
        if params:
            operation["parameters"] = [
                {"name": p, "in": "path", "required": True, "schema": _ID} for p in params
            ]
        for name, schema in _QUERY.get(path, {}).items():
            operation.setdefault("parameters", []).append({"name": name, "in": "query", "schema": schema})
        if body == "protobuf":
            operation["requestBody"] = {"required": True, "content": {_PROTOBUF: {"schema": _BINARY}}}
        elif body is not None:
            schema = refs[(body, "validation")]
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
        elif method in ("post", "put"):
            operation["requestBody"] = {"content": {"application/json": {"schema": JSON_OBJECT}}}
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "thinker",
            "version": "1",
            "description": "Multi-user LoRA training: seed, Tinker and OpenAI-compatible APIs",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
        "security": [{"apiKey": []}, {"bearer": []}, {}],
    }


def _responses(statuses, media) -> dict:
    content = {m: {"schema": JSON_OBJECT if m.endswith("json") else _BINARY} for m in media}
    responses = {status: {"description": "success", "content": content} for status in statuses}
    error = {"application/json": {"schema": {"type": "object", "required": ["error"]}}}
    for status in ERRORS:
        responses.setdefault(status, {"description": "error: the message names the field or limit", "content": error})
    return responses


def _apply_limits(components: dict, config) -> None:
    """The configured limits, as schema maxima (what the edge checks)."""
    limits = {
        ("AddLoraBody", "rank"): config.max_lora_rank,
        ("LoraConfigBody", "rank"): config.max_lora_rank,
        ("SamplingParamsBody", "max_tokens"): config.max_sample_tokens,
        ("SampleBody", "num_samples"): config.max_prompts_per_request,
        ("CompletionBody", "max_tokens"): config.max_sample_tokens,
        ("ChatCompletionBody", "max_tokens"): config.max_sample_tokens,
        ("ChatCompletionBody", "max_completion_tokens"): config.max_sample_tokens,
        ("CompletionBody", "n"): config.max_prompts_per_request,
        ("ChatCompletionBody", "n"): config.max_prompts_per_request,
    }
    for name, schema in components.items():
        for (model, field), maximum in limits.items():
            prop = schema.get("properties", {}).get(field)
            if name.endswith(model) and prop is not None:
                for option in [prop, *prop.get("anyOf", [])]:
                    if option.get("type") == "integer":
                        option["maximum"] = maximum


@bp.get("/openapi.json")
def openapi_json():
    return document(current_app.extensions["thinker"].config)
