"""ClusterBackend: the HFBackend interface, served by model workers on Ray (EXECUTOR=ray).

The HTTP layer and the worker pool call this exactly as they call an HFBackend. Each job goes
to the worker its adapter is placed on (placement.py) and the call waits for the answer, so
the worker pool's per-adapter order holds across the hop: the pool never runs two jobs of one
adapter at once. A fused group (``forward_backward``, ``optim_steps``) is split by worker and
the parts run at once, each worker fusing its part into one pass.

What stays in this process: the edge work (tokenizer, validation), the adapters' records
(mirror.py) and everything above the backend (keys, store, futures, HTTP). What goes to the
workers: every model computation. Worker faults and moves are in recovery.py.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path

from backend.cluster.mirror import ClusterAdapters
from backend.cluster.placement import DOWN, UP, Placement
from backend.cluster.recovery import Recovery, WorkerLostError
from backend.cluster.views import ResidencyView, SamplerView
from backend.cluster.worker import WorkerRestarted
from backend.cluster.workers import Handle, RayWorkers
from backend.hf_backend import HFBackend
from backend.lora.optimizer import AdamParams
from backend.sample.sampling import SamplingParams
from backend.train.fused_pass import FwdBwdRequest
from thinker.core.config import Config
from thinker.core.errors import NotFoundError, RequestFailedError, ThinkerError
from thinker.core.paths import path_under

log = logging.getLogger("thinker.cluster")


class ClusterBackend:
    name = "HF/ray"
    compute = None  # no torch in this process

    # The edge work is HFBackend's own code: it reads only the tokenizer, ``loaded`` and the
    # adapters' records, which this process has.
    base_names = HFBackend.base_names
    resolve_model = HFBackend.resolve_model
    render_conversations = HFBackend.render_conversations
    render_prompts = HFBackend.render_prompts
    allowed_targets = HFBackend.allowed_targets

    def __init__(self, config: Config, workers: RayWorkers | None = None) -> None:
        self.config = config
        self.workers = workers or RayWorkers(config)
        self.placement = Placement()
        self.adapters = ClusterAdapters()
        self.after_step_hooks: list[Callable] = []
        self.data_dir = Path(config.thinker_data_dir)
        self.sampler: SamplerView | None = None
        self.residency = ResidencyView(self)
        self._sampler_args: tuple[int, float] | None = None
        self._handles: dict[str, Handle] = {}
        self._lock = threading.Lock()
        self.recovery = Recovery(self)
        for handle in self.workers.spawn(self.workers.default_count()):
            self._join(handle)
        first = next(iter(self._handles.values()))
        self.loaded, self.vocab_size = self.workers.ray.get(first.actor.facts.remote())
        self.tokenizer = self.loaded.tokenizer
        self.device = self.loaded.device
        self.recovery.start()

    # ---- workers ------------------------------------------------------------------------------

    def _join(self, handle: Handle) -> None:
        with self._lock:
            self._handles[handle.name] = handle
        if self._sampler_args is not None:
            self._invoke(handle.name, "start_sampler", *self._sampler_args)
        self.placement.add_worker(handle.name)

    def add_worker(self) -> dict:
        """Start one more worker; new adapters are placed on it from now on."""
        handle = self.workers.spawn()[0]
        self._join(handle)
        return {"name": handle.name, **handle.info}

    def handle(self, name: str) -> Handle:
        with self._lock:
            if name not in self._handles:
                raise NotFoundError(f"worker {name!r} is not in this cluster; workers: {sorted(self._handles)}")
            return self._handles[name]

    def worker_names(self) -> list[str]:
        with self._lock:
            return list(self._handles)

    def worker_table(self) -> list[dict]:
        """Per worker: state, device, adapters placed, calls in flight (queue), busy."""
        rows = []
        with self._lock:
            infos = {name: handle.info for name, handle in self._handles.items()}
        for row in self.placement.table():
            if (info := infos.get(row["name"])) is None:
                continue  # being removed (drained)
            rows.append({**row, "device": info["device"], "host": info["host"], "pid": info["pid"],
                         "busy": row["queue"] > 0})
        return rows

    def placements(self) -> dict[str, list[str]]:
        """Worker -> the adapter ids placed on it (for admins: ids are not shown to other users)."""
        return {name: self.placement.held(name) for name in self.worker_names()}

    # ---- calling a worker ---------------------------------------------------------------------

    def _submit(self, worker: str, method: str, *args, **kwargs):
        handle = self.handle(worker)
        self.placement.begin(worker)
        return handle, handle.actor.call.remote(handle.incarnation, method, *args, **kwargs)

    def _outcome(self, worker: str, handle: Handle, method: str, get: Callable[[], tuple[bool, object]]):
        """The value of a call, its exception raised, or WorkerLostError when the worker died."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        try:
            ok, value = get()
        except (RayActorError, ActorUnavailableError) as exc:
            self.recovery.worker_failed(worker, handle.incarnation, str(exc).splitlines()[0] if str(exc) else "")
            raise WorkerLostError(worker, method) from None
        finally:
            self.placement.end(worker)
        if not ok:
            if isinstance(value, WorkerRestarted):
                self.recovery.worker_failed(worker, handle.incarnation, "it was restarted")
                raise WorkerLostError(worker, method)
            raise value  # type: ignore[misc]
        return value

    def _invoke(self, worker: str, method: str, *args, **kwargs):
        handle, ref = self._submit(worker, method, *args, **kwargs)
        return self._outcome(worker, handle, method, lambda: self.workers.ray.get(ref))

    def _invoke_async(self, worker: str, method: str, *args) -> Future:
        handle, ref = self._submit(worker, method, *args)
        answer: Future = Future()

        def settle(done: Future) -> None:
            # (on a thread of our own: a lost worker's recovery makes blocking calls, which
            # Ray's callback thread must not wait on)
            def run() -> None:
                _settle(answer, lambda: self._outcome(worker, handle, method, done.result))

            threading.Thread(target=run, name="thinker-cluster-answer", daemon=True).start()

        ref.future().add_done_callback(settle)
        return answer

    def home(self, adapter_id: str) -> str:
        """The worker that holds a trainable adapter (waits while a lost worker's adapters are
        being restored elsewhere)."""
        with self.recovery.lock:
            worker = self.placement.home(adapter_id)
        if worker is None:
            raise NotFoundError(self.adapters.missing_message(adapter_id))
        return worker

    def _sampling_worker(self, adapter_id: str | None) -> str:
        """Where to sample: the base model on the least busy worker, frozen weights on the
        least busy of their replicas, a trainable adapter on its home."""
        if adapter_id is None:
            return self.placement.least_busy()
        with self.recovery.lock:
            homes = self.placement.homes(adapter_id)
        if not homes:
            raise NotFoundError(self.adapters.missing_message(adapter_id))
        adapter = self.adapters.find(adapter_id)
        if adapter is not None and not adapter.trainable:
            self.recovery.maybe_replicate(adapter_id, homes)
            return self.placement.least_busy(homes)
        return homes[0]

    # ---- jobs: adapters -------------------------------------------------------------------------

    def _create(self, worker: str, adapter_id: str, trainable: bool, owner: str | None, method: str, args: tuple,
                kwargs: dict | None = None):
        """Claim ``adapter_id`` in the records, build it on ``worker`` with ``method``, place it."""

        def build(new_id: str) -> dict:
            described = self._invoke(worker, method, *args, **(kwargs or {}))
            self.placement.place(new_id, worker)
            return described

        return self.adapters.create(build, adapter_id, trainable, owner)

    def add_lora(self, rank: int, alpha: float, target_modules: Sequence[str] | None, seed: int | None,
                 adapter_id: str | None = None, owner: str | None = None) -> dict:
        worker = self.placement.choose(group=owner)
        adapter_id = adapter_id or f"base_lora_{secrets.token_hex(6)}"
        args = (rank, alpha, list(target_modules) if target_modules else None, seed)
        self._create(worker, adapter_id, True, owner, "add_lora", args, {"adapter_id": adapter_id, "owner": owner})
        return self.describe(adapter_id)

    def create_from_checkpoint(self, folder: Path, adapter_id: str | None, optimizer: bool, trainable: bool,
                               owner: str | None = None) -> dict:
        worker = self.placement.choose(group=owner)
        adapter_id = adapter_id or f"base_lora_{secrets.token_hex(6)}"
        args = (folder, adapter_id, optimizer, trainable, owner)
        self._create(worker, adapter_id, trainable, owner, "create_from_checkpoint", args)
        if not trainable:
            self.recovery.sources[adapter_id] = folder  # replicas load from here
        return self.describe(adapter_id)

    def restore_adapter(self, folder: Path, adapter_id: str, owner: str | None, step: int) -> dict:
        worker = self.placement.choose(group=owner)
        self._create(worker, adapter_id, True, owner, "restore_adapter", (folder, adapter_id, owner, step))
        return self.describe(adapter_id)

    def snapshot(self, adapter_id: str, snapshot_id: str) -> dict:
        source = self.adapters.get(adapter_id)
        self._create(self.home(adapter_id), snapshot_id, False, source.owner, "snapshot", (adapter_id, snapshot_id))
        return self.describe(snapshot_id)

    def describe(self, adapter_id: str) -> dict:
        adapter = self.adapters.get(adapter_id)
        described = adapter.describe()
        return {**described, "worker": self.placement.home(adapter_id)}

    def remove_adapter(self, adapter_id: str) -> None:
        self.adapters.get(adapter_id)  # NotFoundError first, as HFBackend
        for worker in self.placement.unplace(adapter_id):
            try:
                self._invoke(worker, "remove_adapter", adapter_id)
            except (NotFoundError, WorkerLostError):
                pass  # already gone with its worker
        self.recovery.sources.pop(adapter_id, None)
        self.adapters.remove(adapter_id)

    def save_state(self, adapter_id: str, folder: Path, optimizer: bool) -> None:
        self._invoke(self.home(adapter_id), "save_state", adapter_id, folder, optimizer)

    def load_state(self, adapter_id: str, folder: Path, optimizer: bool) -> dict:
        self._invoke(self.home(adapter_id), "load_state", adapter_id, folder, optimizer)
        return self.describe(adapter_id)

    def export_folder(self, adapter_id: str) -> Path:
        step = f"step_{self.adapters.get(adapter_id).step:06d}"
        return path_under(self.data_dir / "adapters", adapter_id, step, field_name="model_id")

    def save_adapter(self, adapter_id: str, folder: Path | None = None) -> dict:
        return self._invoke(self.home(adapter_id), "save_adapter", adapter_id, folder)

    # ---- jobs: training ---------------------------------------------------------------------------

    def _split(self, adapter_ids: Sequence[str | None]) -> tuple[dict[str, list[int]], dict[int, BaseException]]:
        """Indexes per worker (the base model's go to the least busy), and per-index errors."""
        parts: dict[str, list[int]] = defaultdict(list)
        failed: dict[int, BaseException] = {}
        for i, adapter_id in enumerate(adapter_ids):
            try:
                parts[self.home(adapter_id) if adapter_id else self.placement.least_busy()].append(i)
            except (ThinkerError, LookupError) as exc:
                failed[i] = exc if isinstance(exc, ThinkerError) else WorkerLostError("-", "placement")
        return parts, failed

    def _fan_out(self, method: str, items: Sequence, adapter_ids: Sequence[str | None]) -> list:
        """Run ``method`` (a list-in, list-out group runner) on each worker's share of ``items``
        at once; one outcome per item, in order."""
        parts, failed = self._split(adapter_ids)
        outcomes: list = [failed.get(i) for i in range(len(items))]
        calls = [(w, idx, *self._submit(w, method, [items[i] for i in idx])) for w, idx in parts.items()]
        for worker, idx, handle, ref in calls:
            try:
                results = self._outcome(worker, handle, method, lambda ref=ref: self.workers.ray.get(ref))
            except BaseException as exc:  # noqa: BLE001 - the whole share fails with it
                results = [exc] * len(idx)
            for i, result in zip(idx, results, strict=True):
                outcomes[i] = result
        return outcomes

    def forward_backward(self, requests: Sequence[FwdBwdRequest]) -> list[dict | BaseException]:
        outcomes = self._fan_out("forward_backward", requests, [q.adapter_id for q in requests])
        now = time.time()
        for request, result in zip(requests, outcomes, strict=True):
            adapter = self.adapters.find(request.adapter_id) if request.adapter_id else None
            if adapter is None:
                continue
            adapter.last_used_at = now
            if isinstance(result, dict) and request.backward:  # the counters HFBackend keeps, kept here
                adapter.tokens_trained += result["num_tokens"]
                adapter.last_loss = result["loss"]
                adapter.loss_history.append((now, adapter.step, result["loss"]))
        return outcomes

    def forward_backward_one(self, request: FwdBwdRequest) -> dict:
        return HFBackend.forward_backward_one(self, request)  # type: ignore[arg-type]

    def optim_steps(self, steps: Sequence[tuple[str, AdamParams]]) -> list[dict | BaseException]:
        outcomes = self._fan_out("optim_steps", steps, [adapter_id for adapter_id, _ in steps])
        for (adapter_id, _), result in zip(steps, outcomes, strict=True):
            adapter = self.adapters.find(adapter_id)
            if adapter is None or not isinstance(result, dict):
                continue
            adapter.step = result["step"]
            adapter.last_used_at = time.time()
            adapter.optimizer.state["stepped"] = True  # (checkpoint sizes count the moments now)
            for hook in self.after_step_hooks:  # in the adapter's turn, as HFBackend runs them
                hook(adapter)
        return outcomes

    def optim_step(self, adapter_id: str, adam: AdamParams) -> dict:
        outcome = self.optim_steps([(adapter_id, adam)])[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    # ---- jobs: sampling -------------------------------------------------------------------------

    def prompt_logprobs(self, adapter_id: str | None, tokens: Sequence[int], topk: int):
        return self._invoke(self._sampling_worker(adapter_id), "prompt_logprobs", adapter_id, list(tokens), topk)

    def complete(self, adapter_id: str | None, prompts: Sequence[list[int]], params: SamplingParams) -> list:
        return self._invoke(self._sampling_worker(adapter_id), "complete", adapter_id, list(prompts), params)

    def complete_async(
        self, adapter_id: str | None, prompts: Sequence[list[int]], params: SamplingParams, on_tokens=None
    ) -> Future:
        """As HFBackend's: ``on_tokens(row, tokens, logprobs)`` hears the tokens as the worker's
        decode loop makes them (a Ray streaming generator), before the future completes.
        ``future.cancel()`` only lets the caller go: the worker's rows decode on to their end
        (the cancel does not reach the worker's engine yet)."""
        worker = self._sampling_worker(adapter_id)
        if on_tokens is None:
            return self._invoke_async(worker, "complete_async", adapter_id, list(prompts), params)
        handle = self.handle(worker)
        self.placement.begin(worker)
        chunks = handle.actor.stream.options(num_returns="streaming").remote(
            handle.incarnation, adapter_id, list(prompts), params
        )
        answer: Future = Future()

        def relay() -> tuple[bool, object]:
            for ref in chunks:
                kind, *rest = self.workers.ray.get(ref)
                if kind == "tokens":
                    on_tokens(*rest)
                else:
                    return rest[0], rest[1]
            raise RequestFailedError(f"worker {worker} ended a stream without its answer")

        def pump() -> None:
            _settle(answer, lambda: self._outcome(worker, handle, "complete_async", relay))

        threading.Thread(target=pump, name="thinker-cluster-stream", daemon=True).start()
        return answer

    def sample(self, adapter_id: str | None, prompts: Sequence[list[int]], params: SamplingParams) -> dict:
        return self._invoke(self._sampling_worker(adapter_id), "sample", adapter_id, list(prompts), params)

    def sample_async(self, adapter_id: str | None, prompts: Sequence[list[int]], params: SamplingParams) -> Future:
        return self._invoke_async(self._sampling_worker(adapter_id), "sample_async", adapter_id, list(prompts), params)

    def start_sampler(self, max_rows: int, window_s: float) -> None:
        """Start the shared decode loop on every worker (and on those that join later)."""
        self._sampler_args = (max_rows, window_s)
        for worker in self.placement.workers(UP):
            self._invoke(worker, "start_sampler", max_rows, window_s)
        self.sampler = SamplerView(self)

    # ---- the rest -------------------------------------------------------------------------------

    def worker_stats(self) -> list[dict]:
        """Each worker's own figures (sampler, resident adapters) beside the placement table's."""
        table = self.worker_table()
        refs = [(row, self.handle(row["name"]).actor.stats.remote()) for row in table if row["state"] != DOWN]
        for row, ref in refs:
            try:
                own = self.workers.ray.get(ref, timeout=5)
                row.update({k: own[k] for k in ("adapters_resident", "offloads", "reloads", "calls", "sampler")})
            except Exception:  # noqa: BLE001 - a worker that does not answer shows without its figures
                pass
        return table

    def info(self) -> dict:
        info = {
            "base_model": self.loaded.public_name,
            "device": str(self.device),
            "dtype": str(self.loaded.dtype).removeprefix("torch."),
            "context_length": self.loaded.context_length,
            "target_modules": self.loaded.target_modules,
            "adapters": len(self.adapters),
            "adapters_resident": self.residency.resident,  # on the workers' accelerators
            "executor": "ray",
            "model_workers": self.worker_table(),  # ("workers" is the pool's thread count)
        }
        if self.loaded.fallback_reason:
            info["fallback_reason"] = self.loaded.fallback_reason
        return info

    def close(self) -> None:
        self.recovery.stop()
        for name in self.worker_names():
            self.workers.kill(self.handle(name))
        self.workers.shutdown()


def _settle(answer: Future, outcome: Callable[[], object]) -> None:
    """Set ``answer`` to ``outcome()`` or its exception, unless its caller cancelled it."""
    try:
        value = outcome()
    except BaseException as exc:  # noqa: BLE001 - handed to the waiting job
        if answer.set_running_or_notify_cancel():
            answer.set_exception(exc)
        return
    if answer.set_running_or_notify_cancel():
        answer.set_result(value)
