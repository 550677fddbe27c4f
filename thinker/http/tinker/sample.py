"""Tinker API: sampling sessions and sampling (``sample`` and ``compute_logprobs``).

A sampling session samples from the base model, a live adapter (one engine under both
APIs: an adapter made with /add_lora is a valid ``base_model`` here), a checkpoint loaded
as a frozen adapter, or a frozen snapshot. Requests on frozen weights do not queue behind
each other: they all join the shared decode loop at once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from concurrent.futures import Future as ConcurrentFuture

from backend import SamplingParams
from backend.lora import adapters
from thinker.core.errors import BadRequestError, ConflictError, NotFoundError, ThinkerError
from thinker.http.auth import check_owner, owner
from thinker.http.services import check_sampling_length
from thinker.http.tinker.common import (
    SAMPLE,
    body,
    bp,
    check_base_model,
    owned_checkpoint,
    owned_session,
    services,
    tokenizer_id,
    with_render,
)
from thinker.http.tinker.schemas import CreateSamplingSessionBody, SampleBody
from thinker.http.tinker.sessions import IDLE_BEFORE_FREEING_S, Sampler
from thinker.store.checkpoints import TinkerPath

CHECKPOINTS_IN_MEMORY = 16  # checkpoints kept loaded for sampling; idle ones beyond are freed


def _resolve(base_model: str | None, model_path: str | None, sampler_id: str) -> Sampler:
    """What a new sampler samples from."""
    s = services()
    backend = s.backend
    if model_path:
        live = model_path.removeprefix("tinker://")
        if "/" not in live and live in backend.adapters:  # tinker://<model id>: the adapter as it is now
            check_owner(backend.adapters.get(live).owner, adapters.not_found(live))
            return Sampler(sampler_id, tokenizer_id(), live, model_path, owner())
        path = TinkerPath.parse(model_path, "model_path")
        return Sampler(sampler_id, tokenizer_id(), load_checkpoint(path), str(path), owner())
    if base_model is None:
        raise BadRequestError("base_model or model_path is required")
    if base_model in backend.adapters:  # an adapter of the seed API, sampled as it is now
        check_owner(backend.adapters.get(base_model).owner, adapters.not_found(base_model))
        return Sampler(sampler_id, tokenizer_id(), base_model, owner=owner())
    check_base_model(base_model)
    return Sampler(sampler_id, tokenizer_id(), None, owner=owner())


def load_checkpoint(path: TinkerPath) -> str:
    """The frozen adapter serving a checkpoint, loaded if it is not in memory (again)."""
    s = services()
    info = owned_checkpoint(path)
    # The save's time is part of the id: a checkpoint saved again under the same name (an RL
    # loop's "latest") is a new adapter, never the cached copy of the old weights.
    adapter_id = f"checkpoint:{path.run_id}/{path.checkpoint_id}@{info.created_at:.6f}"
    try:
        folder = s.checkpoints.folder(path)
        s.backend.create_from_checkpoint(folder, adapter_id, optimizer=False, trainable=False, owner=info.owner)
    except ConflictError:
        return adapter_id  # already loaded (perhaps just now, by a concurrent request)
    loaded = [a for a in s.backend.adapters.all() if a.id.startswith("checkpoint:") and a.id != adapter_id]
    for adapter in sorted(loaded, key=lambda a: a.last_used_at)[: max(0, len(loaded) + 1 - CHECKPOINTS_IN_MEMORY)]:
        if s.backend.adapters.idle(adapter.id, IDLE_BEFORE_FREEING_S):
            s.backend.remove_adapter(adapter.id)  # reloaded from disk if a sampler needs it again
    return adapter_id


@bp.post("/create_sampling_session")
def create_sampling_session():
    s, req = services(), body(CreateSamplingSessionBody)
    owned_session(req.session_id)
    sampler_id = f"{req.session_id}:sample:{req.sampling_session_seq_id}"
    if sampler_id not in s.tinker.samplers:
        s.tinker.add_sampler(_resolve(req.base_model, req.model_path, sampler_id), req.session_id)
    return {"sampling_session_id": sampler_id}


@bp.get("/samplers/<path:sampler_id>")
def get_sampler(sampler_id: str):
    sampler = services().tinker.samplers.get(sampler_id)
    if sampler is None:
        raise NotFoundError(f"sampler {sampler_id!r} is unknown")
    check_owner(sampler.owner, f"sampler {sampler_id!r} is unknown")
    return {"sampler_id": sampler.id, "base_model": sampler.base_model, "model_path": sampler.model_path}


def _params(req: SampleBody, vocab: int, prompt_tokens: int) -> SamplingParams:
    p, limit = req.sampling_params, services().config.max_sample_tokens
    if p.max_tokens is not None and p.max_tokens > limit:
        raise BadRequestError(f"sampling_params.max_tokens: {p.max_tokens} is over this server's limit of {limit}")
    window = services().backend.loaded.context_length
    if prompt_tokens >= window:
        raise BadRequestError(f"prompt: {prompt_tokens} tokens fill the context window of {window}")
    if p.max_tokens is not None:
        check_sampling_length(prompt_tokens, p.max_tokens, "prompt")
    stop = p.stop
    strings = (stop,) if isinstance(stop, str) else tuple(x for x in stop or () if isinstance(x, str))
    token_ids = tuple(x for x in stop or () if isinstance(x, int))
    if any(not 0 <= t < vocab for t in token_ids):
        raise BadRequestError(f"sampling_params.stop: token ids must lie in [0, {vocab})")
    return SamplingParams(
        max_tokens=p.max_tokens or min(limit, window - prompt_tokens),  # unset: up to the window's end
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=max(p.top_k, 0),
        seed=p.seed,
        stop=strings,
        stop_token_ids=token_ids,
        stop_at_eos=stop is None,  # an explicit stop list replaces end-of-sequence ([] stops at length only)
        keep_stop_token=True,
    )


def _prompt_tokens(req: SampleBody, vocab: int) -> list[int]:
    tokens: list[int] = []
    for i, chunk in enumerate(req.prompt.chunks):
        if chunk.type != "encoded_text":
            raise BadRequestError(f"prompt.chunks[{i}]: {chunk.type} chunks are not supported (text models only)")
        tokens += chunk.tokens
    if not tokens:
        raise BadRequestError("prompt: no tokens")
    if max(tokens) >= vocab:
        raise BadRequestError(f"prompt: token ids must lie in [0, {vocab})")
    return tokens


@bp.post("/asample")
def asample():
    s, req = services(), body(SampleBody)
    if req.sampling_session_id is not None:
        sampler = s.tinker.samplers.get(req.sampling_session_id)
        unknown = f"sampling_session_id {req.sampling_session_id!r} is unknown"
        if sampler is None:
            raise NotFoundError(unknown)
        check_owner(sampler.owner, unknown)
    else:
        sampler = _resolve(req.base_model, req.model_path, "stateless")
    if sampler.released:
        raise BadRequestError(
            f"sampler {sampler.id}: {sampler.released}; save weights with save_weights_for_sampler(name) to keep them"
        )
    for name in ("topk_sample_logprobs", "prompt_alt_tokens_k"):
        if getattr(req, name):
            raise BadRequestError(f"{name}: not supported by this server")
    if req.target_prompt_logprobs is not None:
        raise BadRequestError("target_prompt_logprobs: not supported by this server")
    if req.num_samples > s.config.max_prompts_per_request:
        limit = s.config.max_prompts_per_request
        raise BadRequestError(f"num_samples: {req.num_samples} is over this server's limit of {limit}")
    vocab = s.backend.vocab_size
    tokens = _prompt_tokens(req, vocab)
    params = _params(req, vocab, len(tokens))
    if sampler.model_path and sampler.adapter_id not in s.backend.adapters:
        sampler.adapter_id = load_checkpoint(TinkerPath.parse(sampler.model_path))  # freed while idle: load again
    # A live adapter's samples keep their place in its queue (behind training sent before);
    # frozen weights and the base model need no order, so their requests run side by side.
    frozen = sampler.adapter_id is None or not s.backend.adapters.get(sampler.adapter_id).trainable
    key = None if frozen else sampler.adapter_id

    recording = _recording_session(sampler) if req.record_stability_info else None

    def submit() -> str:
        future = s.pool.reserve(key, "sample")  # its id names the sequences, recorded when they finish
        record = None if recording is None else _recorder(future.id, recording, sampler.owner)
        job = _sampling_job(sampler.adapter_id, tokens, params, req, record)
        return with_render(s.pool.submit(key, "sample", job, future=future), SAMPLE).id

    # A resend of the same (sampler, seq_id) gets the first request's id and runs nothing.
    resend_key = req.seq_id is not None and req.sampling_session_id is not None
    future_id = s.tinker.sample_once(sampler.id, req.seq_id, submit) if resend_key else submit()
    return {"request_id": future_id, "sample_sequence_ids": sequence_ids(future_id, req.num_samples)}


def sequence_ids(request_id: str, num_samples: int) -> list[str]:
    """The ``sequence_id`` of each sequence a sampling request returns (the SDK attaches them)."""
    return [f"{request_id}:{i}" for i in range(num_samples)]


def _recording_session(sampler: Sampler) -> str:
    """The session that owns what ``sampler`` records: recorded sequences are trained on by
    requests of the same session only, so a sampler outside any session cannot record."""
    if ":sample:" not in sampler.id:
        raise BadRequestError(
            "record_stability_info: needs a sampling session (create_sampling_client / "
            "save_weights_and_get_sampling_client), not a stateless sample"
        )
    return sampler.id.split(":sample:", 1)[0]


def _recorder(request_id: str, session_id: str, owner: str | None) -> Callable[[list], None]:
    recorded = services().tinker.recorded

    def record(completions: list) -> None:
        ids = sequence_ids(request_id, len(completions))
        recorded.record(session_id, owner, [(i, c.tokens, c.logprobs) for i, c in zip(ids, completions, strict=True)])

    return record


def _sampling_job(
    adapter_id: str | None,
    tokens: list[int],
    params: SamplingParams,
    req: SampleBody,
    record: Callable[[list], None] | None = None,
):
    """The job: prompt logprobs if asked, then the completions; the adapter stays pinned
    (never freed) from now until the job is done."""
    backend = services().backend
    if adapter_id is not None:
        backend.adapters.pin(adapter_id)

    def release() -> None:
        if adapter_id is not None:
            backend.adapters.unpin(adapter_id)

    def job() -> ConcurrentFuture:
        try:
            prompt_logprobs, top, completions = _prompt_and_completions()
        except BaseException:
            release()
            raise
        result: ConcurrentFuture = ConcurrentFuture()

        def done(f: ConcurrentFuture) -> None:
            release()
            if f.exception() is not None:
                result.set_exception(f.exception())
                return
            if record is not None:
                try:
                    record(f.result())  # before the result: a client may train on it at once
                except (ThinkerError, sqlite3.Error) as exc:  # a full disk: the promised record is missing
                    result.set_exception(exc)
                    return
            sequences = [{"tokens": c.tokens, "logprobs": c.logprobs, "stop_reason": c.stop_reason} for c in f.result()]
            result.set_result(
                {
                    "sequences": sequences,
                    "prompt_logprobs": prompt_logprobs if req.prompt_logprobs else None,
                    "topk_prompt_logprobs": top,
                }
            )

        completions.add_done_callback(done)
        return result

    def _prompt_and_completions():
        prompt_logprobs = top = None
        if req.prompt_logprobs or req.topk_prompt_logprobs:
            prompt_logprobs, top = backend.prompt_logprobs(adapter_id, tokens, req.topk_prompt_logprobs)
            if req.prompt_logprobs_last_n:  # only the last N positions are scored
                cut = max(0, len(tokens) - req.prompt_logprobs_last_n)
                prompt_logprobs = [None] * cut + prompt_logprobs[cut:]
                top = None if top is None else [None] * cut + top[cut:]
        prompts = [tokens] * req.num_samples
        if backend.sampler is not None:
            return prompt_logprobs, top, backend.complete_async(adapter_id, prompts, params)
        completions: ConcurrentFuture = ConcurrentFuture()
        completions.set_result(backend.complete(adapter_id, prompts, params))
        return prompt_logprobs, top, completions

    return job
