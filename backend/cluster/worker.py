"""One model worker: today's engine (an HFBackend on one device) inside a Ray actor.

The worker is the unit the cluster places adapters on. It knows nothing about HTTP, keys, the
store or other workers: the server's ClusterBackend (facade.py) calls it, one adapter's jobs
one at a time and in order (the worker pool guarantees that before the hop), and several
adapters' jobs at once (a threaded actor; on CPU the HFBackend's compute thread still runs
torch one job at a time, and its decode loop batches concurrent samples as it does locally).

Interface, kept small so that a worker spanning several GPUs (tensor-parallel, in a Ray
placement group) can replace this class without touching the facade: ``ready()``,
``facts()``, ``call(incarnation, method, *args, **kwargs)``, ``export_state`` /
``import_state`` (moves), ``held()`` and ``stats()``. Exceptions come back as values (``call`` returns
``(ok, value)``) so a BadRequestError raised here is the same BadRequestError at the edge.
"""

from __future__ import annotations

import os
import pickle
import queue
import secrets
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

from thinker.core.config import Config
from thinker.core.errors import RequestFailedError

# What the facade may call through ``call``: the HFBackend's jobs (a fixed list: a worker
# runs nothing it was not built to run).
JOBS = frozenset({
    "add_lora", "remove_adapter", "save_state", "load_state", "create_from_checkpoint", "restore_adapter",
    "snapshot", "forward_backward", "optim_steps", "prompt_logprobs", "complete", "complete_async", "sample",
    "sample_async", "save_adapter", "start_sampler",
})


class WorkerRestarted(Exception):
    """The actor behind a handle is a new incarnation: what the caller placed on it is gone."""


def portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (ours do), else a RequestFailedError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - anything unpicklable becomes plain text
        return RequestFailedError(f"{type(exc).__name__}: {exc}")


def worker_config(config: Config, cpus: float, gpus: int) -> Config:
    """The worker's own view of the config: its device is the one Ray gave it (Ray sets
    CUDA_VISIBLE_DEVICES, so "cuda" is that GPU), its torch threads the CPUs it asked for."""
    device = None if gpus else "cpu"
    return replace(config, device=device, torch_threads=str(max(1, int(cpus))))


class ModelWorker:
    """The HFBackend of one device, run as a Ray actor (``ray.remote(ModelWorker)``)."""

    def __init__(self, config: Config, name: str, cpus: float = 1.0, gpus: int = 0) -> None:
        from backend import load_backend

        self.name = name
        # A new token each time Ray (re)starts this actor: the facade passes the one it knows
        # with every call, so a call that reaches a restarted, empty worker says so instead of
        # answering "not found" for adapters it never had.
        self.incarnation = secrets.token_hex(8)
        self.backend = load_backend(worker_config(config, cpus, gpus))
        self._lock = threading.Lock()
        self._busy = 0  # calls running now
        self._calls = 0  # calls finished

    def ready(self) -> dict:
        """Who this worker is: its incarnation, process and device (the facade's health ping)."""
        return {
            "name": self.name,
            "incarnation": self.incarnation,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "device": str(self.backend.device),
        }

    def facts(self):
        """The model as the HTTP edge needs it: name, tokenizer, context length, targets, its
        config; no weights (``lora_layers`` names only), so the server holds no copy."""
        loaded = self.backend.loaded
        model = SimpleNamespace(config=loaded.model.config)  # (get_info reports its architecture)
        return replace(loaded, model=model, lora_layers=dict.fromkeys(loaded.lora_layers)), self.backend.vocab_size

    def call(self, incarnation: str, method: str, *args, **kwargs) -> tuple[bool, object]:
        """Run one HFBackend job; (True, result) or (False, the exception it raised)."""
        if incarnation != self.incarnation:
            return False, WorkerRestarted(self.name)
        if method not in JOBS:
            return False, RequestFailedError(f"worker {self.name}: no job named {method!r}")
        with self._lock:
            self._busy += 1
        try:
            value = getattr(self.backend, method)(*args, **kwargs)
            if isinstance(value, Future):  # the decode loop's answer: this actor thread waits for it
                value = value.result()
            return True, value
        except BaseException as exc:  # noqa: BLE001 - the caller re-raises it at the edge
            return False, portable(exc)
        finally:
            with self._lock:
                self._busy -= 1
                self._calls += 1

    def stream(self, incarnation: str, adapter_id: str | None, prompts: list, params) -> Iterator[tuple]:
        """``complete_async`` with its tokens as they come (a Ray streaming generator): yields
        ("tokens", row index, tokens, logprobs) after each decode step, then ("done", ok, value)."""
        if incarnation != self.incarnation:
            yield ("done", False, WorkerRestarted(self.name))
            return
        chunks: queue.Queue = queue.Queue()
        with self._lock:
            self._busy += 1
        try:
            try:
                future = self.backend.complete_async(
                    adapter_id, prompts, params, on_tokens=lambda i, t, lp: chunks.put((i, list(t), list(lp)))
                )
            except BaseException as exc:  # noqa: BLE001 - the caller re-raises it at the edge
                yield ("done", False, portable(exc))
                return
            future.add_done_callback(lambda _: chunks.put(None))  # (after the last tokens: engine.py)
            while (chunk := chunks.get()) is not None:
                yield ("tokens", *chunk)
            error = future.exception()
            yield ("done", error is None, portable(error) if error is not None else future.result())
        finally:
            with self._lock:
                self._busy -= 1
                self._calls += 1

    def export_state(self, incarnation: str, adapter_id: str) -> tuple[bool, object]:
        """The adapter's checkpoint files (weights + optimizer state) as bytes, to move it:
        they travel through Ray's object store, not the data dir (see docs/cluster.md)."""
        folder = Path(tempfile.mkdtemp(prefix="thinker-move-"))
        try:
            ok, value = self.call(incarnation, "save_state", adapter_id, folder, True)
            if not ok:
                return ok, value
            return True, {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def import_state(
        self, incarnation: str, files: dict[str, bytes], adapter_id: str, owner: str | None, step: int,
        trainable: bool,
    ) -> tuple[bool, object]:
        """Make ``adapter_id`` here from ``export_state``'s files."""
        folder = Path(tempfile.mkdtemp(prefix="thinker-move-"))
        try:
            for name, data in files.items():
                (folder / name).write_bytes(data)
            if trainable:
                return self.call(incarnation, "restore_adapter", folder, adapter_id, owner, step)
            return self.call(incarnation, "create_from_checkpoint", folder, adapter_id, False, False, owner)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def held(self) -> list[str]:
        """The adapters this worker has (the facade frees those it no longer places here)."""
        return [a.id for a in self.backend.adapters.all()]

    def stats(self) -> dict:
        backend = self.backend
        sampler = backend.sampler.stats() if backend.sampler is not None else {}
        with self._lock:
            busy, calls = self._busy, self._calls
        return {
            **self.ready(),
            "adapters": len(backend.adapters),
            "adapters_resident": backend.residency.resident,
            "offloads": backend.residency.offloads,
            "reloads": backend.residency.reloads,
            "busy": busy,
            "calls": calls,
            "sampler": sampler,
        }
