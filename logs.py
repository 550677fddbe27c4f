"""Structured logging: every record carries the request id and adapter id it belongs to.

Being built: see issue 6.
"""

from __future__ import annotations

import logging

from flask import Flask


def configure(level: str) -> None:
    """Set up the root logger at ``level`` (LOG_LEVEL)."""
    logging.basicConfig(level=level.upper(), format="[%(asctime)s] %(levelname)s %(message)s")


def install(app: Flask) -> None:
    """Give each HTTP request an id, visible in every log record made while serving it."""
