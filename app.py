"""thinker: a multi-user LoRA fine-tuning server on one shared base model.

Wiring only: ``python app.py`` (or ``thinker-server``) claims the data dir and the port,
loads the base model once (``backend/``), starts the worker pool (``worker_pool.py``),
opens the store (``thinker/store/``) and serves the routes (``thinker/http/``) through
waitress. ``create_app(config)`` builds the same app for tests.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
import threading
import time
from pathlib import Path

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from thinker.core.config import Config
from thinker.core.errors import (
    ConfigurationError,
    InsufficientStorageError,
    ServerError,
    ThinkerError,
    clip_message,
)
from thinker.http import startup

log = logging.getLogger("thinker")

SHUTDOWN_DRAIN_S = 120.0  # how long SIGTERM lets running jobs finish
_HTTP_ERROR_TYPES = {404: "NotFoundError", 405: "MethodNotAllowedError", 413: "PayloadTooLargeError"}


def create_app(config: Config | None = None, backend=None) -> Flask:
    """Load the base model (or serve an already loaded ``backend``), start the worker
    pool and wire the routes."""
    config = config or Config.from_env()
    if config.use_megatron:
        raise ConfigurationError(
            "USE_MEGATRON=true, but this build has no Megatron backend. Unset USE_MEGATRON (or set it "
            "to false) to run the HuggingFace backend."
        )
    # Imported here so a refused start (bad settings, Megatron) answers in a blink instead
    # of after the seconds torch and transformers take to import.
    from backend import load_backend
    from thinker.http import auth, caps, dashboard, oai, openapi, seed, state
    from thinker.http import tinker as tinker_routes
    from thinker.http.idempotency import install_idempotency
    from thinker.http.services import Services
    from thinker.obs import logs, metrics
    from thinker.store.adapter_records import AdapterRecords
    from thinker.store.checkpoints import CheckpointStore
    from thinker.store.database import Database
    from thinker.store.diskspace import DiskReserve
    from worker_pool import BatchLimits, WorkerPool

    if backend is None and config.executor == "ray":
        from backend.cluster import ClusterBackend

        log.info("Starting model workers on Ray (docs/cluster.md)...")
        backend = ClusterBackend(config)
    if backend is None:
        log.info("Initializing HuggingFace backend...")
        backend = load_backend(config)
    loaded = backend.loaded
    log.info("Worker pool size: %d threads", config.max_workers)
    limits = None
    if config.batching:
        window_s = config.batch_window_ms / 1000
        limits = BatchLimits(config.max_batch_tokens, config.max_batch_sequences, window_s)
        if backend.sampler is None:
            backend.start_sampler(config.max_batch_sequences, window_s)
    Path(config.thinker_data_dir).mkdir(parents=True, exist_ok=True)
    reserve = DiskReserve(config.thinker_data_dir, config.disk_reserve_bytes)
    reserve.ensure()  # on a full disk: says so (once), and saves are refused with 507
    database = Database(Path(config.thinker_data_dir) / "thinker.db", on_full=reserve.release)
    if (recovered := database.recover()):
        log.warning("%d requests were queued or running when the server last stopped; they now say so", recovered)
    pool = WorkerPool(
        config.max_workers,
        database=database,
        max_pending=config.max_pending,
        max_pending_per_user=config.max_pending_per_user,
        future_ttl_s=config.future_ttl_s,
        max_result_bytes=config.max_result_cache_bytes,
        runners={"fwdbwd": backend.forward_backward, "optim_step": backend.optim_steps},
        limits=limits,
    )
    log.info("Worker pool initialized. Concurrent job processing: Enabled (%s)", backend.name)
    if limits:
        log.info(
            "Fused batching: on (MAX_BATCH_TOKENS=%d, MAX_BATCH_SEQUENCES=%d, BATCH_WINDOW_MS=%g)",
            config.max_batch_tokens, config.max_batch_sequences, config.batch_window_ms,
        )
    else:
        log.info("Fused batching: off (one request per pass)")
    log.info("Base model loaded on %s", loaded.device.type)
    if (plan := getattr(backend.compute, "plan", None)) is not None:
        log.info("%s", plan.describe())  # TORCH_THREADS, docs/threads.md

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes  # larger bodies: 413
    app.json.sort_keys = False
    app.extensions["thinker"] = Services(
        config=config,
        backend=backend,
        pool=pool,
        checkpoints=CheckpointStore(config.thinker_data_dir, database, reserve, config.max_storage_bytes_per_user),
        tinker=tinker_routes.TinkerState(pool, database),
        download_secret=secrets.token_bytes(32),
        database=database,
    )
    logs.install(app)
    auth.install(app, auth.KeyRing.from_config(config, database))
    caps.install(app, config)
    metrics.install(app)
    install_idempotency(app)
    records = AdapterRecords(database, app.extensions["thinker"].checkpoints)
    restored, lost = records.recover(backend, restore=config.autosave_every_steps > 0)
    if restored or lost:
        log.warning("after the restart: %d adapters restored from their newest checkpoint, %d lost", restored, lost)
    records.attach(backend)
    if config.executor == "ray":
        from thinker.http import workers

        workers.install(app, records, restore=config.autosave_every_steps > 0)  # /admin/workers, fault recovery
    backend.adapters.max_per_owner = config.max_adapters_per_user  # (restored adapters are never refused)
    if config.autosave_every_steps:
        services = app.extensions["thinker"]
        services.autosaver = state.Autosaver(services, config.autosave_every_steps)
        backend.after_step_hooks.append(services.autosaver.after_step)
    app.register_blueprint(seed.bp)
    app.register_blueprint(state.bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(tinker_routes.bp)
    app.register_blueprint(oai.bp)
    app.register_blueprint(dashboard.bp)
    _register_error_handlers(app)
    return app


def close_app(app: Flask) -> None:
    """Release what create_app took: the worker pool stops (queued jobs fail; running ones
    are not waited for), the backend's threads stop and the SQLite connection is closed."""
    services = app.extensions["thinker"]
    services.pool.shutdown(wait=False)
    services.backend.close()
    services.database.close()


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ThinkerError)
    def thinker_error(exc: ThinkerError):
        retry_after_s = getattr(exc, "retry_after_s", None)  # 429 (limits) and 503 (draining)
        headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else {}
        return jsonify(exc.to_dict()), exc.status_code, headers

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        kind = _HTTP_ERROR_TYPES.get(exc.code or 500, "BadRequestError" if (exc.code or 500) < 500 else "ServerError")
        return jsonify({"error": clip_message(str(exc.description)), "type": kind}), exc.code

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error")
        return jsonify(ServerError(f"{type(exc).__name__}: {exc}").to_dict()), 500


def main() -> None:
    try:
        config = Config.from_env()
    except ConfigurationError as exc:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        log.error("%s", exc.message)
        sys.exit(2)
    from thinker.obs import logs

    logs.configure(config.log_level, config.log_format)
    try:
        # Claimed before anything is loaded or recovered: a second server on the same data dir
        # or port stops here, leaving the running one's database alone.
        data_lock = startup.lock_data_dir(config.thinker_data_dir)  # noqa: F841 - held until exit
        listener = startup.bind_listener(config.host, config.port)
        app = create_app(config)
    except (ConfigurationError, InsufficientStorageError) as exc:  # (the latter: a migration on a full disk)
        log.error("cannot start: %s", exc.message)
        sys.exit(2)

    from waitress import serve

    services = app.extensions["thinker"]

    def drain() -> None:
        services.pool.shutdown(wait=True, drain_s=SHUTDOWN_DRAIN_S)
        if services.autosaver is not None:  # nothing runs now: save what stepped since its autosave
            log.info("autosaved %d adapters before exiting", services.autosaver.flush())
        time.sleep(1.0)  # let waiting long-polls send the answers they just got
        os.kill(os.getpid(), signal.SIGUSR1)  # -> exit() in the main thread: waitress stops, main() returns

    def stop(signum, _frame) -> None:
        """SIGTERM: finish running jobs, fail queued ones (their futures say why), autosave (if
        on) what stepped since its last autosave, then exit.
        The HTTP loop keeps running meanwhile, so clients hear about their requests."""
        log.info("%s: finishing running jobs, failing queued ones, then exiting", signal.Signals(signum).name)
        threading.Thread(target=drain, name="thinker-drain", daemon=True).start()

    def exit_(_signum, _frame) -> None:
        raise SystemExit(0)  # (our own signal: SIGINT may be ignored, as in background jobs)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGUSR1, exit_)
    log.info(" * Running on http://%s:%d (waitress, %d HTTP threads)", config.host, config.port, config.http_threads)
    try:
        serve(app, sockets=[listener], threads=config.http_threads, ident="thinker")
    finally:
        close_app(app)
        log.info("stopped")


if __name__ == "__main__":
    main()
