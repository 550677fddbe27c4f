"""The Tinker API under /api/v1: what the official ``tinker`` SDK speaks, on the same
engine, worker pool and adapters as the seed API (see README, "Tinker SDK")."""

from thinker.http.tinker import rest, sample, service, train  # noqa: F401 - they register the routes
from thinker.http.tinker.common import bp
from thinker.http.tinker.sessions import TinkerState

__all__ = ["TinkerState", "bp"]
