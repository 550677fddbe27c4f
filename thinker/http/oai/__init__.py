"""The OpenAI-compatible API under /oai/api/v1: chat completions, completions and models,
in the shapes of the OpenAI API, on the same decode loop, keys, limits and ownership as
every other sampling request (see docs/oai.md)."""

from thinker.http.oai import models, routes  # noqa: F401 - they register the routes
from thinker.http.oai.common import bp

__all__ = ["bp"]
