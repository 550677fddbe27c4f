"""The live dashboard at GET / (HTML, plain JS + SVG shipped in this repo; no CDN).

Being built: see issue 6.
"""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("dashboard", __name__)
