"""Prometheus metrics at GET /metrics (prometheus_client), every name prefixed ``thinker_``.

Being built: see issue 6.
"""

from __future__ import annotations

from flask import Flask


def install(app: Flask) -> None:
    """Register GET /metrics and the per-request instrumentation on ``app``."""
