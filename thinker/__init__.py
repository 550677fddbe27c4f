"""thinker: a multi-user LoRA fine-tuning server on one shared base model.

The package holds everything but the three rooms the top level names: ``app.py`` (wiring),
``worker_pool.py`` (scheduling) and ``backend/`` (model execution).

- ``thinker.core``: configuration, the error tree, safe paths (imported by every layer).
- ``thinker.http``: the edge: routes of the seed API, the state routes, the Tinker API,
  request schemas, keys, caps, idempotency, OpenAPI and the dashboard.
- ``thinker.store``: what outlives the process: SQLite, futures, checkpoints, adapter records.
- ``thinker.obs``: logs, metrics and the scripts' progress bars.
"""
