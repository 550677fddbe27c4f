"""ClusterBackend's routing, records, faults and moves, in process: the workers are real
ModelWorkers (each its own HFBackend on builtin-tiny) behind a stand-in for Ray that runs each
call at once, so these run in the unit lane without a Ray cluster. test_ray.py runs the real one.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import pytest
from ray.exceptions import RayActorError

from backend import AdamParams, FwdBwdRequest, HFBackend, SamplingParams
from backend.cluster import ClusterBackend
from backend.cluster.placement import DOWN
from backend.cluster.recovery import WorkerLostError
from backend.cluster.worker import ModelWorker
from backend.cluster.workers import Handle
from backend.train.examples import Example
from thinker.core.config import Config
from thinker.core.errors import BadRequestError, NotFoundError

pytestmark = pytest.mark.unit

EXAMPLE = Example.from_sequence([5, 9, 12, 40, 7, 3, 11, 60], [0, 0, 0, 1, 1, 1, 1, 1])


class Ref:
    """An ObjectRef whose value is already there (or whose actor is dead)."""

    def __init__(self, fn) -> None:
        self.value, self.error = None, None
        try:
            self.value = fn()
        except RayActorError as exc:
            self.error = exc

    def future(self) -> Future:
        f: Future = Future()
        f.set_exception(self.error) if self.error else f.set_result(self.value)
        return f


class Method:
    def __init__(self, actor: Actor, name: str) -> None:
        self.actor, self.name = actor, name

    def options(self, **_options) -> Method:
        return self

    def remote(self, *args, **kwargs):
        def run():
            if self.actor.dead:
                raise RayActorError()
            return getattr(self.actor.worker, self.name)(*args, **kwargs)

        if self.name == "stream":  # a streaming generator: one ref per item, as they come
            return (Ref(lambda item=item: item) for item in run())
        return Ref(run)


class Actor:
    def __init__(self, worker: ModelWorker) -> None:
        self.worker, self.dead = worker, False

    def __getattr__(self, name: str) -> Method:
        return Method(self, name)


class FakeRay:
    @staticmethod
    def get(ref: Ref, timeout: float | None = None):
        if ref.error:
            raise ref.error
        return ref.value


class FakeWorkers:
    """RayWorkers' interface, with in-process actors."""

    def __init__(self, config: Config, count: int) -> None:
        self.config, self.count, self.ray, self.next = config, count, FakeRay(), 0
        self.actors: list[Actor] = []

    def default_count(self) -> int:
        return self.count

    def spawn(self, count: int = 1) -> list[Handle]:
        handles = []
        for _ in range(count):
            actor = Actor(ModelWorker(self.config, f"w{self.next}"))
            self.actors.append(actor)
            info = actor.worker.ready()
            handles.append(Handle(f"w{self.next}", actor, info["incarnation"], info))
            self.next += 1
        return handles

    def kill(self, handle: Handle) -> None:
        handle.actor.dead = True
        handle.actor.worker.backend.close()

    def shutdown(self) -> None:
        pass


@pytest.fixture
def config(cache_dir, tmp_path) -> Config:
    return Config(base_model="builtin-tiny", thinker_cache_dir=str(cache_dir), thinker_data_dir=str(tmp_path),
                  executor="ray", workers=2)


@pytest.fixture
def cluster(config):
    backend = ClusterBackend(config, FakeWorkers(config, 2))
    backend.recovery.stop()  # no health thread: the tests kill and notice deaths themselves
    yield backend
    backend.close()


def train(backend, adapter_id: str, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        losses.append(backend.forward_backward([FwdBwdRequest(adapter_id, [EXAMPLE])])[0]["loss"])
        backend.optim_steps([(adapter_id, AdamParams(learning_rate=1e-2))])
    return losses


def test_users_spread_over_workers_and_a_fused_group_is_split_by_worker(cluster, backend: HFBackend):
    a = cluster.add_lora(4, 8.0, None, 1, owner="alice")
    b = cluster.add_lora(4, 8.0, None, 1, owner="bob")
    assert a["worker"] != b["worker"]
    requests = [FwdBwdRequest(a["model_id"], [EXAMPLE]), FwdBwdRequest(b["model_id"], [EXAMPLE])]
    outcomes = cluster.forward_backward(requests)
    assert outcomes[0]["loss"] == pytest.approx(outcomes[1]["loss"], abs=1e-6)  # same seed, another worker
    adam = AdamParams(learning_rate=1e-2)
    stepped = cluster.optim_steps([(a["model_id"], adam), (b["model_id"], adam)])
    assert [s["step"] for s in stepped] == [1, 1]
    record = cluster.adapters.get(a["model_id"])
    assert (record.step, record.tokens_trained, record.last_loss) == (1, outcomes[0]["num_tokens"], outcomes[0]["loss"])
    # The same work on one local backend gives the same numbers.
    local = backend.add_lora(4, 8.0, None, 1)["model_id"]
    try:
        assert train(backend, local, 2)[1] == pytest.approx(train(cluster, a["model_id"], 1)[0], abs=1e-6)
        params = SamplingParams(max_tokens=8, temperature=0.9, seed=3)
        assert cluster.sample(a["model_id"], [[5, 9, 12]], params) == backend.sample(local, [[5, 9, 12]], params)
    finally:
        backend.remove_adapter(local)


def test_token_listeners_hear_the_tokens_as_they_come_before_the_answer(cluster, backend: HFBackend):
    cluster.start_sampler(8, 0.0)
    heard: dict[int, list[list[int]]] = {}
    params = SamplingParams(max_tokens=6, temperature=0.9, seed=1)
    listen = lambda i, tokens, logprobs: heard.setdefault(i, []).append(tokens)  # noqa: E731
    future = cluster.complete_async(None, [[5, 9], [7, 8, 9]], params, on_tokens=listen)
    completions = future.result(timeout=60)
    assert {i: sum(chunks, []) for i, chunks in heard.items()} == {i: c.tokens for i, c in enumerate(completions)}
    assert max(len(chunks) for chunks in heard.values()) > 1  # streamed, not handed over at the end
    assert [c.tokens for c in completions] == [c.tokens for c in backend.complete(None, [[5, 9], [7, 8, 9]], params)]


def test_errors_from_a_worker_arrive_as_themselves(cluster):
    with pytest.raises(BadRequestError, match="target_modules"):
        cluster.add_lora(4, 8.0, ["no_such_layer"], 1, owner="alice")
    assert len(cluster.adapters) == 0  # the claimed id was released
    with pytest.raises(NotFoundError):
        cluster.forward_backward_one(FwdBwdRequest("base_lora_missing", [EXAMPLE]))


def test_a_dead_worker_s_adapters_come_back_from_their_newest_checkpoint_or_are_lost(cluster, tmp_path):
    saved = cluster.add_lora(4, 8.0, None, 1, owner="alice")["model_id"]
    unsaved = cluster.add_lora(4, 8.0, None, 2, owner="alice")["model_id"]
    train(cluster, saved, 2)
    folder = tmp_path / "autosave"
    cluster.save_state(saved, folder, True)
    train(cluster, saved, 1)  # step 3: beyond the checkpoint, lost with the worker
    lost_ids = []
    cluster.recovery.newest = lambda adapter_id: (folder, 2) if adapter_id == saved else None
    cluster.recovery.mark_lost = lost_ids.append
    victim = cluster.placement.home(saved)
    cluster.handle(victim).actor.dead = True
    with pytest.raises(WorkerLostError, match=f"worker lost: model worker {victim}"):
        cluster.forward_backward_one(FwdBwdRequest(saved, [EXAMPLE]))
    assert cluster.placement.state(victim) == DOWN
    assert cluster.placement.home(saved) != victim and cluster.adapters.get(saved).step == 2
    assert train(cluster, saved, 1)  # trains on, on the other worker
    assert lost_ids == [unsaved] and unsaved not in cluster.adapters
    assert "died" in cluster.recovery.lost_why[unsaved]


def test_a_restarted_worker_is_a_loss_not_a_bare_not_found(cluster):
    adapter_id = cluster.add_lora(4, 8.0, None, 1, owner="alice")["model_id"]
    worker = cluster.placement.home(adapter_id)
    cluster.handle(worker).actor.worker.incarnation = "new"  # as after Ray restarted it
    with pytest.raises(WorkerLostError):
        cluster.forward_backward_one(FwdBwdRequest(adapter_id, [EXAMPLE]))
    assert cluster.placement.state(worker) == DOWN


def test_a_move_keeps_weights_and_optimizer_state(cluster, backend: HFBackend):
    moved = cluster.add_lora(4, 8.0, None, 1, owner="alice")["model_id"]
    local = backend.add_lora(4, 8.0, None, 1)["model_id"]
    try:
        train(cluster, moved, 2)
        train(backend, local, 2)
        source = cluster.placement.home(moved)
        target = cluster.recovery.move(moved)
        assert target != source and cluster.placement.homes(moved) == [target]
        assert cluster.adapters.get(moved).step == 2
        assert train(cluster, moved, 1) == pytest.approx(train(backend, local, 1), abs=1e-6)  # Adam moments came too
    finally:
        backend.remove_adapter(local)


def test_draining_and_adding_workers(cluster, config):
    first = cluster.add_lora(4, 8.0, None, 1, owner="alice")["model_id"]
    home = cluster.placement.home(first)
    for adapter_id in cluster.recovery.drain_start(home):
        cluster.recovery.move(adapter_id, home)
    cluster.recovery.drain_finish(home)
    assert home not in cluster.worker_names() and cluster.placement.home(first) in cluster.worker_names()
    added = cluster.add_worker()["name"]
    assert cluster.add_lora(4, 8.0, None, 1, owner="bob")["worker"] == added  # the empty one


def test_busy_sampler_weights_get_a_replica(cluster, tmp_path: Path):
    source = cluster.add_lora(4, 8.0, None, 1, owner="alice")["model_id"]
    cluster.save_state(source, tmp_path / "ckpt", False)
    frozen = cluster.create_from_checkpoint(tmp_path / "ckpt", "checkpoint:x", False, False, owner="alice")
    home = frozen["worker"]
    for _ in range(2):
        cluster.placement.begin(home)  # two calls in flight on its only copy
    loading = cluster.recovery.maybe_replicate("checkpoint:x", [home])
    loading.join(timeout=60)
    assert len(cluster.placement.homes("checkpoint:x")) == 2
    assert cluster.recovery.move("checkpoint:x", home) != home  # draining a copy just drops it
    assert cluster.placement.homes("checkpoint:x") == [w for w in cluster.worker_names() if w != home]
    cluster.remove_adapter("checkpoint:x")  # freed on every copy
    assert cluster.placement.homes("checkpoint:x") == []


def test_a_worker_taken_out_by_mistake_rejoins_empty(cluster, tmp_path):
    adapter_id = cluster.add_lora(4, 8.0, None, 1, owner="alice")["model_id"]
    cluster.save_state(adapter_id, tmp_path / "ckpt", True)
    cluster.recovery.newest = lambda a: (tmp_path / "ckpt", 0)
    worker = cluster.placement.home(adapter_id)
    cluster.recovery.worker_failed(worker, cluster.handle(worker).incarnation, "a call failed in transit")
    assert cluster.placement.home(adapter_id) != worker  # restored on the other one
    cluster.recovery._check(worker)  # it answers the health check: it rejoins ...
    assert cluster.placement.state(worker) == "up"
    assert cluster.handle(worker).actor.worker.held() == []  # ... without its stale copy
    assert cluster.add_lora(4, 8.0, None, 2, owner="bob")["worker"] == worker  # and takes new adapters
