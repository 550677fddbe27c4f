"""The Tinker API under /api/v1: what the official ``tinker`` SDK speaks, on the same
engine, worker pool and adapters as the seed API (see README, "Tinker SDK")."""

from tinker_api import rest, sample, service, train  # noqa: F401 - they register the routes
from tinker_api.common import bp
from tinker_api.sessions import TinkerState

__all__ = ["TinkerState", "bp"]
