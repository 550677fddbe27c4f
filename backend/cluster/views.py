"""``backend.sampler`` and ``backend.residency`` for /healthz, /metrics and the dashboard on
EXECUTOR=ray: the workers' own figures, summed (the HTTP layer reads them as from one HFBackend)."""

from __future__ import annotations


class SamplerView:
    """``backend.sampler`` for /healthz and /metrics: the workers' decode loops, summed."""

    def __init__(self, backend) -> None:
        self.backend = backend

    def stats(self) -> dict:
        total: dict = {"sampling_rows": 0, "sampling_waiting": 0}
        for row in self.backend.worker_stats():
            for key, value in (row.get("sampler") or {}).items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    total[key] = total.get(key, 0) + value
        return total


class ResidencyView:
    """``backend.residency`` for /metrics: adapters on the workers' accelerators, summed."""

    def __init__(self, backend) -> None:
        self.backend = backend

    def _sum(self, key: str) -> int:
        return sum(row.get(key, 0) for row in self.backend.worker_stats())

    @property
    def resident(self) -> int:
        return self._sum("adapters_resident")

    @property
    def offloads(self) -> int:
        return self._sum("offloads")

    @property
    def reloads(self) -> int:
        return self._sum("reloads")
