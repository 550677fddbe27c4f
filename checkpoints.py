"""Checkpoints on disk: where they live, what they are, and their ``tinker://`` names.

A checkpoint is a folder ``<data_dir>/checkpoints/<run_id>/<kind>/<name>/`` holding a PEFT
adapter (``adapter_config.json`` + ``adapter_model.safetensors``), for training states
also ``optimizer.pt``, and ``checkpoint.json`` (what the listing endpoints report). It is
named ``tinker://<run_id>/<kind>/<name>``, as the Tinker SDK expects. Kinds:
``weights`` (save_state: weights + optimizer), ``sampler_weights`` (weights for sampling),
``external_weights`` (an export for download).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from errors import BadRequestError, NotFoundError

KINDS = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
_SAFE = re.compile(r"^[A-Za-z0-9._:@+=-]{1,200}$")  # run ids and names: no "/" and no ".."


@dataclass(frozen=True)
class TinkerPath:
    run_id: str
    kind: str
    name: str

    @classmethod
    def parse(cls, path: str, field_name: str = "path") -> TinkerPath:
        if not isinstance(path, str) or not path.startswith("tinker://"):
            raise BadRequestError(f"{field_name}: {path!r} is not a tinker:// path")
        parts = path.removeprefix("tinker://").split("/")
        if len(parts) != 3 or parts[1] not in KINDS:
            raise BadRequestError(
                f"{field_name}: {path!r} is not of the form tinker://<run_id>/<{'|'.join(KINDS)}>/<name>"
            )
        run_id, kind, name = parts
        check_name(run_id, f"{field_name} (run id)")
        check_name(name, f"{field_name} (checkpoint name)")
        return cls(run_id, kind, name)

    @property
    def checkpoint_id(self) -> str:
        return f"{self.kind}/{self.name}"

    def __str__(self) -> str:
        return f"tinker://{self.run_id}/{self.kind}/{self.name}"


def check_name(value: str, field_name: str) -> str:
    if not isinstance(value, str) or not _SAFE.match(value) or value in {".", ".."}:
        raise BadRequestError(
            f"{field_name}: {value!r} must be 1-200 characters of letters, digits and . _ : @ + = -"
        )
    return value


@dataclass
class CheckpointInfo:
    """What ``checkpoint.json`` holds."""

    tinker_path: str
    run_id: str
    kind: str
    name: str
    base_model: str
    rank: int
    alpha: float
    target_modules: list[str]
    step: int
    created_at: float = field(default_factory=time.time)
    has_optimizer: bool = False
    size_bytes: int = 0
    user_metadata: dict[str, str] = field(default_factory=dict)
    expires_at: float | None = None
    public: bool = False
    owner: str | None = None  # who saved it (see auth.py)

    def describe(self) -> dict:
        """The SDK's ``Checkpoint`` shape."""
        return {
            "checkpoint_id": f"{self.kind}/{self.name}",
            "checkpoint_type": KINDS[self.kind],
            "time": _iso(self.created_at),
            "tinker_path": self.tinker_path,
            "size_bytes": self.size_bytes,
            "public": self.public,
            "user_metadata": self.user_metadata or None,
            "expires_at": _iso(self.expires_at) if self.expires_at else None,
        }


def not_found(path: TinkerPath) -> str:
    return f"checkpoint {path} does not exist"


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


class CheckpointStore:
    def __init__(self, data_dir: str | Path) -> None:
        self.root = Path(data_dir).resolve() / "checkpoints"
        self._lock = threading.Lock()
        self._expired_at = 0.0

    def folder(self, path: TinkerPath) -> Path:
        return self.root / path.run_id / path.kind / path.name

    def exists(self, path: TinkerPath) -> bool:
        return (self.folder(path) / "checkpoint.json").exists()

    def write_info(self, info: CheckpointInfo) -> None:
        folder = self.folder(TinkerPath.parse(info.tinker_path))
        info.size_bytes = sum(f.stat().st_size for f in folder.iterdir() if f.name != "checkpoint.json")
        tmp = folder / "checkpoint.json.tmp"
        tmp.write_text(json.dumps(asdict(info), indent=1))
        tmp.replace(folder / "checkpoint.json")  # atomic: a listed checkpoint is complete

    def get(self, path: TinkerPath) -> CheckpointInfo:
        self._expire()
        try:
            return CheckpointInfo(**json.loads((self.folder(path) / "checkpoint.json").read_text()))
        except FileNotFoundError:
            raise NotFoundError(not_found(path)) from None

    def list(self, run_id: str | None = None) -> list[CheckpointInfo]:
        """Every checkpoint (of one run), oldest first."""
        self._expire()
        pattern = f"{run_id}/*/*/checkpoint.json" if run_id else "*/*/*/checkpoint.json"
        found = []
        for meta in self.root.glob(pattern) if self.root.exists() else []:
            try:
                found.append(CheckpointInfo(**json.loads(meta.read_text())))
            except (OSError, ValueError, TypeError):
                continue  # being written or deleted right now
        return sorted(found, key=lambda c: c.created_at)

    def update(self, path: TinkerPath, **changes) -> CheckpointInfo:
        with self._lock:
            info = self.get(path)
            for key, value in changes.items():
                setattr(info, key, value)
            self.write_info(info)
        return info

    def delete(self, path: TinkerPath) -> None:
        folder = self.folder(path)
        if not self.exists(path):
            raise NotFoundError(not_found(path))
        shutil.rmtree(folder, ignore_errors=True)

    def archive(self, path: TinkerPath) -> bytes:
        """The checkpoint's PEFT adapter as a .tar.gz (adapter_config.json, adapter_model.safetensors)."""
        self.get(path)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                tar.add(self.folder(path) / name, arcname=name)
        return buffer.getvalue()

    def _expire(self) -> None:
        """Delete checkpoints whose TTL ran out (a scan of every checkpoint: once a minute at most)."""
        now = time.time()
        if not self.root.exists() or now - self._expired_at < 60:
            return
        self._expired_at = now
        for meta in self.root.glob("*/*/*/checkpoint.json"):
            try:
                expires = json.loads(meta.read_text()).get("expires_at")
            except (OSError, ValueError):
                continue
            if expires and expires < now:
                shutil.rmtree(meta.parent, ignore_errors=True)
