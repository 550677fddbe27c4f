"""The HF backend: every model computation the server runs, on the one shared base model.

Methods named like jobs (``add_lora``, ``forward_backward``, ``optim_step``, ``sample``,
``save_adapter``) are called by worker threads and run where torch runs (the compute
thread on CPU); the worker pool guarantees that no two jobs of one adapter run at once
and that they run in submission order. ``render_*`` and ``resolve_model`` are cheap and
run at the HTTP edge.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import torch

from backend import failures
from backend.compute_thread import ComputeThread, InlineRunner
from backend.lora import state as adapter_state
from backend.lora.adapters import Adapter, LiveAdapters
from backend.lora.optimizer import AdamParams, adamw_steps
from backend.lora.peft_files import save_peft_adapter
from backend.lora.residency import Residency
from backend.model.loading import LoadedModel
from backend.sample.decode import generate
from backend.sample.engine import SamplingEngine
from backend.sample.sampling import SampleRow, SamplingParams, prompt_logprobs, sample_response
from backend.train.examples import Example, render_conversation, render_prompt
from backend.train.fused_pass import FwdBwdRequest, check_request, describe_size, fused_pass
from backend.train.output_head import PLAIN_HEAD_MODELS
from thinker.core.errors import BadRequestError, ThinkerError
from thinker.core.paths import path_under

BASE_ALIAS = "base"


def on_compute_thread(method):
    """Run this model computation where the backend runs torch (see compute_thread.py)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if kwargs:
            return self.compute.run(functools.partial(method, **kwargs), self, *args)
        return self.compute.run(method, self, *args)

    return run


class HFBackend:
    name = "HF"

    def __init__(self, loaded: LoadedModel, data_dir: str | Path, compute=None, max_resident_adapters: int = 128):
        """``compute``: where model work runs (a ComputeThread, best the one that loaded the
        model; see load_backend). Default: a new compute thread on CPU, inline on GPU.
        ``max_resident_adapters``: adapters on the accelerator at once (see residency.py)."""
        self.loaded = loaded
        if compute is None:
            compute = ComputeThread() if loaded.device.type == "cpu" else InlineRunner()
        self.compute = compute
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.data_dir = Path(data_dir)
        self.adapters = LiveAdapters(loaded.lora_layers)
        self.residency = Residency(self.adapters, loaded.device, max_resident_adapters)
        eos = {loaded.tokenizer.eos_token_id}
        generation_eos = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
        eos.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
        self.eos_ids = {int(t) for t in eos if t is not None}
        self.sampler: SamplingEngine | None = None  # the shared decode loop, when batching
        # called with the adapter after each optimizer step, in its turn (autosave, registry)
        # (first: the LoRA layers' bf16 slot buffers of the stepped adapter are stale now)
        self.after_step_hooks: list = [self.adapters.release_compute_copies]
        head = loaded.model.get_output_embeddings()
        self.plain_head = type(loaded.model).__name__ in PLAIN_HEAD_MODELS and getattr(head, "bias", None) is None
        self.vocab_size = int(loaded.model.get_input_embeddings().weight.shape[0])

    # ---- at the edge -------------------------------------------------------------------

    def base_names(self) -> list[str]:
        return [BASE_ALIAS, self.loaded.name]

    def resolve_model(self, model_id: str, allow_base: bool, field: str = "model_id") -> str | None:
        """An adapter id as-is, or None for the base model; NotFoundError otherwise."""
        if model_id in self.base_names():
            if allow_base:
                return None
            raise BadRequestError(
                f"{field}: {model_id!r} is the base model, which is frozen; pass an adapter id from /add_lora"
            )
        self.adapters.get(model_id)
        return model_id

    def render_conversations(self, conversations: Sequence[Sequence[dict]], check_length=None) -> list[Example]:
        return [render_conversation(self.tokenizer, c, f"data[{i}]", check_length) for i, c in enumerate(conversations)]

    def render_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        return [render_prompt(self.tokenizer, p) for p in prompts]

    # ---- jobs ----------------------------------------------------------------------------

    def allowed_targets(self) -> list[str]:
        """Short names of the layers LoRA may target: the linear layers, and the output head."""
        head = [self.loaded.head_module] if self.loaded.head_module else []
        return list(self.loaded.target_modules) + head

    @on_compute_thread
    def add_lora(
        self,
        rank: int,
        alpha: float,
        target_modules: Sequence[str] | None,
        seed: int | None,
        adapter_id: str | None = None,
        owner: str | None = None,
    ) -> dict:
        """A new adapter; ``target_modules`` None: every linear layer but the output head."""
        targets = list(target_modules) if target_modules else list(self.loaded.target_modules)
        unknown = sorted(set(targets) - set(self.allowed_targets()))
        if unknown:
            why = self.loaded.why_not_targets(unknown)
            raise BadRequestError(
                f"target_modules: {unknown} are not linear layers of this model; allowed: {self.allowed_targets()}"
                + (f" ({why})" if why else "")
            )
        adapter = self.adapters.create(rank, alpha, targets, seed, adapter_id=adapter_id, owner=owner)
        return adapter.describe()

    @on_compute_thread
    def remove_adapter(self, adapter_id: str) -> None:
        self.adapters.remove(adapter_id)

    @on_compute_thread
    def save_state(self, adapter_id: str, folder: Path, optimizer: bool) -> None:
        """Write the adapter (and its optimizer state) to ``folder`` in PEFT format."""
        adapter = self.adapters.get(adapter_id)
        with self.residency.using([adapter_id]):
            adapter_state.save_state(adapter, self.loaded.lora_layers, self.loaded.path, folder, optimizer)

    @on_compute_thread
    def load_state(self, adapter_id: str, folder: Path, optimizer: bool) -> dict:
        adapter = self._trainable(adapter_id)
        with self.residency.using([adapter_id]):
            adapter_state.load_into(adapter, self.loaded.lora_layers, folder, optimizer)
        return adapter.describe()

    @on_compute_thread
    def create_from_checkpoint(
        self, folder: Path, adapter_id: str | None, optimizer: bool, trainable: bool, owner: str | None = None
    ) -> dict:
        layers = self.loaded.lora_layers
        adapter = adapter_state.create_from(self.adapters, layers, folder, adapter_id, optimizer, trainable, owner)
        return adapter.describe()

    @on_compute_thread
    def restore_adapter(self, folder: Path, adapter_id: str, owner: str | None, step: int) -> dict:
        """Bring an adapter back after a restart, under its own id, from a training checkpoint."""
        layers = self.loaded.lora_layers
        adapter = adapter_state.create_from(self.adapters, layers, folder, adapter_id, True, True, owner)
        adapter.step = step
        return adapter.describe()

    @on_compute_thread
    def snapshot(self, adapter_id: str, snapshot_id: str) -> dict:
        """A frozen copy of the adapter's current weights, for sampling."""
        source = self.adapters.get(adapter_id)
        with self.residency.using([adapter_id]):
            return adapter_state.snapshot(self.adapters, self.loaded.lora_layers, source, snapshot_id).describe()

    def _trainable(self, adapter_id: str):
        adapter = self.adapters.get(adapter_id)
        if not adapter.trainable:
            raise BadRequestError(f"model_id: {adapter_id!r} holds frozen sampler weights; it cannot be trained")
        return adapter

    def check_fwdbwd(self, request: FwdBwdRequest) -> None:
        """Reject what this model cannot run (raised inside the job, failing its future)."""
        if request.backward and request.adapter_id is None:
            raise BadRequestError("the base model is frozen: only a forward pass can run on it")
        if request.backward:
            self._trainable(request.adapter_id)
        check_request(request, self.vocab_size, self.loaded.context_length)

    @on_compute_thread
    def forward_backward(self, requests: Sequence[FwdBwdRequest]) -> list[dict | BaseException]:
        """One forward(+backward) over the rows of every request. Each request's loss is
        computed on its own rows with its own loss function, exactly as if it ran alone,
        and its gradients accumulate on its own adapter. Returns a result or an exception per request: a
        request that cannot run fails alone. If the fused pass runs out of memory, each request
        is retried on its own (only the too-big one fails); any other failure of the shared pass
        fails its requests with that error, without rerunning them (a retry would only fail again,
        at the cost of one pass per request). A failed pass adds no gradient anywhere."""
        outcomes: list[dict | BaseException | None] = [None] * len(requests)
        runnable = []
        for r, request in enumerate(requests):
            try:
                self.check_fwdbwd(request)
                if request.adapter_id is not None:
                    self.adapters.get(request.adapter_id)
                runnable.append(r)
            except ThinkerError as exc:
                outcomes[r] = exc
        if runnable:
            try:
                results = self._fused_pass([requests[r] for r in runnable])
            except Exception as exc:  # noqa: BLE001
                if len(runnable) == 1:
                    results = [failures.explain(exc, describe_size(requests[runnable[0]]))]
                elif failures.is_out_of_memory(exc):
                    results = [self.forward_backward([requests[r]])[0] for r in runnable]
                else:
                    results = [exc] * len(runnable)
            for r, result in zip(runnable, results, strict=True):
                outcomes[r] = result
        return outcomes

    def forward_backward_one(self, request: FwdBwdRequest) -> dict:
        outcome = self.forward_backward([request])[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _fused_pass(self, requests: Sequence[FwdBwdRequest]) -> list[dict | BaseException]:
        with self.residency.using(q.adapter_id for q in requests):
            return self._fused_pass_resident(requests)

    def _fused_pass_resident(self, requests: Sequence[FwdBwdRequest]) -> list[dict | BaseException]:
        # Gradients go to these only, and only once the whole pass has succeeded (fused_pass),
        # so a failed pass needs no copy of the accumulated gradients to roll back to.
        params = {q.adapter_id: self.adapters.get(q.adapter_id).params for q in requests if q.backward and q.adapter_id}
        head_VH = self._plain_head_for(requests)
        results = fused_pass(self.model, head_VH, self.tokenizer.pad_token_id, self.device, requests, params=params)
        for request, result in zip(requests, results, strict=True):
            if request.adapter_id:
                self.adapters.get(request.adapter_id).last_used_at = time.time()
            if isinstance(result, dict) and request.backward and request.adapter_id:
                adapter = self.adapters.get(request.adapter_id)
                adapter.tokens_trained += result["num_tokens"]
                adapter.last_loss = result["loss"]
                adapter.loss_history.append((time.time(), adapter.step, result["loss"]))
        return results

    def _plain_head_for(self, requests: Sequence[FwdBwdRequest]) -> torch.Tensor | None:
        """The head weight when the fast output-head path applies: a plain head that no
        adapter of these requests puts LoRA on."""
        head = self.loaded.head_module
        adapters = {q.adapter_id for q in requests if q.adapter_id}
        if not self.plain_head or any(head in self.adapters.get(a).target_modules for a in adapters):
            return None
        return self.loaded.head_weight

    @on_compute_thread
    def optim_step(self, adapter_id: str, adam: AdamParams) -> dict:
        outcome = self._optim_steps([(adapter_id, adam)])[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    @on_compute_thread
    def optim_steps(self, steps: Sequence[tuple[str, AdamParams]]) -> list[dict | BaseException]:
        """Several adapters' optimizer steps in one job: one fused AdamW launch for all of
        them (see lora/optimizer.py), results in order; each gets its result or the exception
        that failed it. An adapter named twice steps twice, in order."""
        return self._optim_steps(steps)

    def _optim_steps(self, steps: Sequence[tuple[str, AdamParams]]) -> list[dict | BaseException]:
        outcomes: list[dict | BaseException | None] = [None] * len(steps)
        pending = list(range(len(steps)))
        while pending:  # waves of distinct adapters: a repeated one waits for the next wave
            wave, later, seen = [], [], set()
            for i in pending:
                (later if steps[i][0] in seen else wave).append(i)
                seen.add(steps[i][0])
            with self.residency.using(steps[i][0] for i in wave):
                for i, outcome in zip(wave, self._step_wave([steps[i] for i in wave]), strict=True):
                    outcomes[i] = outcome
            pending = later
        return outcomes

    def _step_wave(self, steps: Sequence[tuple[str, AdamParams]]) -> list[dict | BaseException]:
        """Step distinct, resident adapters together."""
        outcomes: list[dict | BaseException | None] = [None] * len(steps)
        found: list[tuple[int, Adapter, AdamParams]] = []
        for i, (adapter_id, adam) in enumerate(steps):
            try:
                found.append((i, self._trainable(adapter_id), adam))
            except ThinkerError as exc:
                outcomes[i] = exc
        stepped = adamw_steps([(adapter, adam) for _, adapter, adam in found])
        for (i, adapter, adam), value in zip(found, stepped, strict=True):
            if isinstance(value, BaseException):
                outcomes[i] = value
                continue
            adapter.step += 1
            adapter.last_used_at = time.time()
            for hook in self.after_step_hooks:
                hook(adapter)
            outcomes[i] = {
                "model_id": adapter.id,
                "step": adapter.step,
                "learning_rate": adam.learning_rate,
                "grad_norm": value,
            }
        return outcomes

    def sample_rows(
        self, adapter_id: str | None, prompts: Sequence[list[int]], params: SamplingParams
    ) -> list[SampleRow]:
        rows = []
        for i, tokens in enumerate(prompts):
            seed = None if params.seed is None else params.seed + i  # reproducible, yet distinct per prompt
            rows.append(SampleRow(adapter_id, tokens, replace(params, seed=seed)))
        return rows

    @on_compute_thread
    def prompt_logprobs(self, adapter_id: str | None, tokens: Sequence[int], topk: int):
        """See sampling.prompt_logprobs."""
        if len(tokens) > self.loaded.context_length:
            limit = self.loaded.context_length
            raise BadRequestError(f"prompt: {len(tokens)} tokens, over the context window of {limit}")
        with self.residency.using([adapter_id]):
            return prompt_logprobs(self.model, adapter_id, tokens, topk, self.device)

    @on_compute_thread
    def complete(self, adapter_id: str | None, prompts: Sequence[list[int]], params: SamplingParams) -> list:
        """Generate for ``prompts`` as one batch of its own (no sharing with other requests)."""
        rows = self.sample_rows(adapter_id, prompts, params)
        with self.residency.using([adapter_id]):
            return generate(self.model, self.tokenizer, rows, self.eos_ids, self.loaded.context_length, self.device)

    def complete_async(
        self, adapter_id: str | None, prompts: Sequence[list[int]], params: SamplingParams, on_tokens=None
    ) -> Future:
        """Join the shared decode loop; the future's result is the completions, in order.
        ``on_tokens(row_index, tokens, logprobs)``: called on the sampler thread after every
        step with the tokens ``prompts[row_index]`` produced in it (see engine.py).
        ``future.cancel()`` drops the rows (queued, or at the next step), as engine.py says."""
        if self.sampler is None:
            raise RuntimeError("no sampling engine: start one with start_sampler()")
        return self.sampler.submit(self.sample_rows(adapter_id, prompts, params), on_tokens)

    def sample(self, adapter_id: str | None, prompts: Sequence[list[int]], params: SamplingParams) -> dict:
        """The seed API's sampling response, from a batch of its own."""
        return sample_response(self.complete(adapter_id, prompts, params))

    def sample_async(self, adapter_id: str | None, prompts: Sequence[list[int]], params: SamplingParams) -> Future:
        """The seed API's sampling response, from the shared decode loop."""
        response: Future = Future()

        def done(engine_future: Future) -> None:
            error = engine_future.exception()
            if error is not None:
                response.set_exception(error)
            else:
                response.set_result(sample_response(engine_future.result()))

        self.complete_async(adapter_id, prompts, params).add_done_callback(done)
        return response

    def start_sampler(self, max_rows: int, window_s: float) -> None:
        self.sampler = SamplingEngine(
            self.model,
            self.tokenizer,
            self.eos_ids,
            self.loaded.context_length,
            self.device,
            max_rows,
            window_s,
            run=self.compute.run,
            hold=self.residency.using,
        )

    @on_compute_thread
    def export_folder(self, adapter_id: str) -> Path:
        """Where ``save_adapter`` puts the adapter's PEFT files at its current step."""
        step = f"step_{self.adapters.get(adapter_id).step:06d}"
        return path_under(self.data_dir / "adapters", adapter_id, step, field_name="model_id")

    def save_adapter(self, adapter_id: str, folder: Path | None = None) -> dict:
        """Write the adapter in PEFT format into ``folder`` (default: ``export_folder``)."""
        adapter = self.adapters.get(adapter_id)
        final = self.export_folder(adapter_id)
        with self.residency.using([adapter_id]):
            save_peft_adapter(adapter, self.loaded.lora_layers, self.loaded.path, folder or final)
        return {"model_id": adapter_id, "step": adapter.step, "path": str(final)}

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
        self.compute.close()

    def info(self) -> dict:
        info = {
            "base_model": self.loaded.public_name,  # public (/healthz): no filesystem paths
            "device": str(self.device),
            "dtype": str(self.loaded.dtype).removeprefix("torch."),
            "context_length": self.loaded.context_length,
            "target_modules": self.loaded.target_modules,
            "adapters": len(self.adapters),
            "adapters_resident": self.residency.resident,  # on the accelerator; the rest wait in CPU memory
            "adapter_offloads": self.residency.offloads,
            "adapter_reloads": self.residency.reloads,
        }
        tuner = getattr(self.compute, "tuner", None)
        if tuner is not None:  # TORCH_THREADS=auto on CPU: the team size now, and how often it changed
            info["torch_threads"], info["torch_thread_changes"] = tuner.threads, tuner.changes
        if self.loaded.fallback_reason:
            info["fallback_reason"] = self.loaded.fallback_reason
        return info
