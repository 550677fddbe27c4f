"""Server configuration: one dataclass, read from environment variables.

Every setting has a typed default here and an environment variable of the same name in
upper case (``max_workers`` <- ``MAX_WORKERS``). Tests build a ``Config`` directly and
hand it to ``create_app``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from thinker.core.errors import ConfigurationError

DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUILTIN_TINY = "builtin-tiny"
DEVICE_PATTERN = re.compile(r"(cpu|cuda|mps)(:\d+)?")


def _default_cache_dir() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "thinker")


@dataclass
class Config:
    host: str = "0.0.0.0"
    port: int = 8000
    # Threads that run queued jobs; different adapters run on different threads at once.
    max_workers: int = 4
    # Hub id or local folder; None means the default model, falling back to builtin-tiny
    # (loudly) when it cannot be loaded. An explicit value that fails to load is fatal.
    base_model: str | None = None
    # The base model's name on every API (get_server_capabilities, get_info's model_name and
    # tokenizer_id, /healthz): what the SDK and the cookbook read to pick a tokenizer and a chat
    # renderer. None: the hub id; for a local folder, its config.json's "_name_or_path" when
    # that names a hub model, else the folder's path. The weights and tokenizer still load from
    # BASE_MODEL.
    served_model_name: str | None = None
    # Accepted for compatibility with the seed server; this build has no Megatron backend.
    use_megatron: bool = False
    # Where builtin-tiny is written (and other generated files).
    thinker_cache_dir: str = field(default_factory=_default_cache_dir)
    # Where saved adapters go.
    thinker_data_dir: str = "thinker_data"
    # Force a device ("cpu", "cuda", "cuda:1"); None picks CUDA when available.
    device: str | None = None
    # Threads torch's ops use on CPU: a whole number >= 1, or "auto": OMP_NUM_THREADS when set,
    # else up to every CPU this process may use, fewer while other processes keep CPUs busy
    # (resized before each job; measured in docs/threads.md).
    torch_threads: str = "auto"
    # CPUs the compute thread (and the OpenMP team it starts) is pinned to, e.g. "2-3" or
    # "0,2"; empty: not pinned, the kernel places it (pinning measured slower beside busy
    # processes: docs/threads.md).
    compute_cpus: str = ""
    # Fuse pending work of different adapters into one pass (BATCHING=off: one request
    # per pass, as the seed server did).
    batching: bool = True
    # Padded tokens (rows x longest row) and rows allowed in one fused training pass; the
    # row limit also caps how many sequences decode together.
    max_batch_tokens: int = 8192
    max_batch_sequences: int = 64
    # How long a pass may wait to gather more work when other users are active, in ms.
    batch_window_ms: float = 5.0
    # Bounds checked at the edge (each breach is a 400 naming the field and the range).
    max_lora_rank: int = 256
    max_examples_per_request: int = 256
    max_prompts_per_request: int = 64
    max_sample_tokens: int = 2048
    max_sequence_tokens: int = 8192  # tokens in one training sequence (and the model's context window)
    max_adapters_per_user: int = 1000  # trainable adapters one key may hold
    # adapters kept on the accelerator at once; the least recently used idle ones beyond
    # wait in CPU memory (backend/lora/residency.py)
    max_resident_adapters: int = 128
    max_body_bytes: int = 64 * 1024 * 1024  # larger request bodies: 413
    # What a forward_backward may declare, checked on its tensors' headers before any is built
    # (a sparse tensor of a few bytes can declare gigabytes): K, the targets per position of
    # top-K (T, K) target_tokens, and the dense values it expands to, examples x longest x K.
    max_target_k: int = 64
    max_request_elements: int = 8 * 1024 * 1024
    # Unfinished requests (queued or running) one key, and everyone, may have: beyond, 429.
    max_pending_per_user: int = 1000
    max_pending: int = 10000
    # Checkpoint every adapter (weights + optimizer) every N optimizer steps; 0: never.
    autosave_every_steps: int = 0
    # Bytes of checkpoints one key may keep in THINKER_DATA_DIR; a save beyond answers 403
    # (StorageQuotaError). 0: no quota.
    max_storage_bytes_per_user: int = 0
    # Disk space set aside in THINKER_DATA_DIR (a file, diskspace.py) and given up when the
    # disk fills, so deletes and request bookkeeping still have room; saves need it back first.
    disk_reserve_bytes: int = 16 * 1024 * 1024
    # Longest a retrieve_future long-poll may hold a connection, in seconds.
    max_long_poll_s: float = 60.0
    # How long finished futures stay retrievable, in seconds.
    future_ttl_s: float = 3600.0
    # Finished results kept in memory (bytes of their JSON); beyond, the oldest are dropped
    # from memory and read back from the database when asked for.
    max_result_cache_bytes: int = 256 * 1024 * 1024
    # How long the synchronous sample endpoint waits for its job, in seconds.
    sample_timeout_s: float = 600.0
    # WSGI threads: long-polls each hold one, so keep this well above MAX_WORKERS.
    # (the Tinker SDK keeps one long-poll open per pending future).
    http_threads: int = 128
    # HTTP requests one key (without keys: one client address) may have open at once, and of
    # those, retrieve_future long-polls: beyond, 429 + Retry-After, so one user's pile of
    # waiting long-polls cannot hold every HTTP thread while others wait for one.
    max_open_requests_per_user: int = 64
    max_long_polls_per_user: int = 32
    log_level: str = "INFO"
    # Log line format: "text" ([time] LEVEL message key=value ...) or "json" (one object per line).
    log_format: str = "text"
    # API keys, comma-separated (THINKER_API_KEYS=tml-alice,tml-bob), and/or a file with one
    # key per line. None of either: open single-user mode (no key needed).
    thinker_api_keys: str | None = None
    thinker_api_keys_file: str | None = None
    # Who runs the model: "local" (this process, one device) or "ray" (Ray actors, one engine
    # per device; docs/cluster.md). The HTTP front end, keys, store and futures stay here.
    executor: str = "local"
    # EXECUTOR=ray: the Ray cluster to join ("auto", "ray://host:10001", host:port); None
    # starts a local one in this process (stopped with the server).
    ray_address: str | None = None
    # EXECUTOR=ray: model workers to start; 0 means one per GPU the cluster has (at least 1).
    workers: int = 0
    # EXECUTOR=ray: CPUs each worker asks Ray for (and the torch threads it runs).
    worker_cpus: float = 1.0
    # Keys (comma-separated) allowed to add and drain workers at run time (/admin/workers);
    # None: only in open single-user mode (no API keys) are they open.
    admin_api_keys: str | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Config:
        """Build a Config from environment variables, rejecting malformed values clearly."""
        environ = dict(os.environ if environ is None else environ)
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name.upper(), raw, f.type)
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        if self.max_workers < 1:
            raise ConfigurationError(f"MAX_WORKERS must be >= 1, got {self.max_workers}")
        if not 1 <= self.port <= 65535:
            raise ConfigurationError(f"PORT must be in 1..65535, got {self.port}")
        if self.max_batch_tokens < 1 or self.max_batch_sequences < 1 or self.batch_window_ms < 0:
            raise ConfigurationError("MAX_BATCH_TOKENS and MAX_BATCH_SEQUENCES must be >= 1, BATCH_WINDOW_MS >= 0")
        limits = (
            "max_sequence_tokens", "max_adapters_per_user", "max_body_bytes", "max_pending_per_user",
            "max_resident_adapters", "max_target_k", "max_request_elements", "max_result_cache_bytes",
        )
        for name in (*limits, "max_pending", "max_open_requests_per_user", "max_long_polls_per_user"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name.upper()} must be >= 1, got {getattr(self, name)}")
        for name in ("max_storage_bytes_per_user", "disk_reserve_bytes"):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"{name.upper()} must be >= 0, got {getattr(self, name)}")
        if self.max_open_requests_per_user >= self.http_threads:
            raise ConfigurationError(
                f"MAX_OPEN_REQUESTS_PER_USER ({self.max_open_requests_per_user}) must be below HTTP_THREADS "
                f"({self.http_threads}), or one user can hold every HTTP thread"
            )
        if self.max_lora_rank < 1:
            raise ConfigurationError(f"MAX_LORA_RANK must be >= 1, got {self.max_lora_rank}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            levels = "DEBUG, INFO, WARNING, ERROR or CRITICAL"
            raise ConfigurationError(f"LOG_LEVEL must be {levels}, got {self.log_level!r}")
        if self.device is not None and not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigurationError(f"DEVICE={self.device!r} is not a device: use cpu, cuda, cuda:N or mps")
        threads = self.torch_threads.strip().lower()
        if threads != "auto" and not (threads.isdigit() and int(threads) >= 1):
            raise ConfigurationError(f"TORCH_THREADS must be auto or a whole number >= 1, got {self.torch_threads!r}")
        try:
            parse_cpu_list(self.compute_cpus)
        except ValueError:
            raise ConfigurationError(
                f"COMPUTE_CPUS must be a CPU list such as 0-3 or 0,2 (or empty), got {self.compute_cpus!r}"
            ) from None
        if self.executor not in ("local", "ray"):
            raise ConfigurationError(f"EXECUTOR must be local or ray, got {self.executor!r}")
        if self.workers < 0 or self.worker_cpus <= 0:
            raise ConfigurationError(
                f"WORKERS must be >= 0 and WORKER_CPUS > 0, got {self.workers} and {self.worker_cpus}"
            )
        if self.log_format.lower() not in ("text", "json"):
            raise ConfigurationError(f"LOG_FORMAT must be text or json, got {self.log_format!r}")


def _parse(name: str, raw: str, type_: object) -> object:
    kind = str(type_)
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        if kind.startswith("bool"):
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not a valid {kind.split(' ')[0]}") from None
    return raw


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """"0-2,5" -> (0, 1, 2, 5); "" -> (). Raises ValueError on anything else."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        if not re.fullmatch(r"\d+(-\d+)?", part):
            raise ValueError(part)
        first, _, last = part.partition("-")
        low, high = int(first), int(last or first)
        if high < low:
            raise ValueError(part)
        cpus.update(range(low, high + 1))
    return tuple(sorted(cpus))
