"""Starting, finding and stopping the Ray actors that hold the model (one per device).

Ray is imported here only, and only when EXECUTOR=ray: the local executor never loads it.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from backend.cluster.worker import ModelWorker
from thinker.core.config import Config
from thinker.core.errors import ConfigurationError

log = logging.getLogger("thinker.cluster")

ROOT = Path(__file__).resolve().parents[2]  # the repository: worker processes import from it
# Threads per actor: one adapter's calls are serial, so this bounds how many adapters' jobs
# (and decode-loop samples) one worker takes at once; the worker pool's threads bound it first.
ACTOR_CONCURRENCY = 64


def runtime_env() -> dict:
    """Worker processes import our modules from this checkout (one machine) or from the same
    path where the code is installed (several machines)."""
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}}


def start_local_ray(num_cpus: float) -> None:
    """A Ray instance inside this process, offering ``num_cpus`` logical CPUs (may exceed the
    real ones: CPU workers then share cores), stopped when this process calls shutdown or exits."""
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env(), log_to_driver=True)


@dataclass
class Handle:
    """One started worker as the facade sees it."""

    name: str
    actor: object  # ray.actor.ActorHandle
    incarnation: str
    info: dict  # ready(): pid, host, device


class RayWorkers:
    """The Ray connection and the actor class; ``spawn`` starts one worker and waits until its
    model is loaded. A worker is restarted by Ray when its process dies (``max_restarts``)."""

    def __init__(self, config: Config) -> None:
        import ray

        self.ray = ray
        self.config = config
        self.started_ray = False
        if not ray.is_initialized():
            if config.ray_address:
                # Joining: every machine must have this code and its requirements installed
                # (docs/cluster.md); the working dir is not shipped.
                ray.init(address=config.ray_address, runtime_env=runtime_env(), log_to_driver=True)
            else:
                start_local_ray(max(os.cpu_count() or 1, int((config.workers or 1) * config.worker_cpus) + 2))
                self.started_ray = True
        self.gpus = int(ray.cluster_resources().get("GPU", 0))
        self.actor_class = ray.remote(ModelWorker)
        self._next = 0
        self._tag = f"{os.getpid()}-{secrets.token_hex(3)}"  # unique per server in a shared cluster

    def default_count(self) -> int:
        return self.config.workers or max(1, self.gpus)

    def spawn(self, count: int = 1) -> list[Handle]:
        """Start ``count`` workers at once (each loads the model: in parallel, not in turn)."""
        started = []
        for _ in range(count):
            name = f"w{self._next}"
            self._next += 1
            gpus = 1 if self.gpus else 0
            actor = self.actor_class.options(
                name=f"thinker-{self._tag}-{name}",  # (as `ray list actors` shows them)
                num_cpus=self.config.worker_cpus,
                num_gpus=gpus,
                max_concurrency=ACTOR_CONCURRENCY,
                max_restarts=-1,  # a killed worker comes back (empty) and rejoins
                max_task_retries=0,  # a job that was running when it died fails: it is never run twice
            ).remote(self.config, name, self.config.worker_cpus, gpus)
            started.append((name, actor, actor.ready.remote()))
        handles = []
        for name, actor, ready in started:
            try:
                info = self.ray.get(ready)
            except Exception as exc:  # noqa: BLE001 - a worker that cannot load the model is fatal
                raise ConfigurationError(f"model worker {name} did not start: {exc}") from None
            log.info("worker %s up: pid %s on %s, device %s", name, info["pid"], info["host"], info["device"])
            handles.append(Handle(name, actor, info["incarnation"], info))
        return handles

    def kill(self, handle: Handle) -> None:
        try:
            self.ray.kill(handle.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def shutdown(self) -> None:
        if self.started_ray:
            self.ray.shutdown()
