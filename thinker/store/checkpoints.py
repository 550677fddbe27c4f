"""Checkpoints on disk: where they live, what they are, and their ``tinker://`` names.

A checkpoint is a folder ``<data_dir>/checkpoints/<run_id>/<kind>/<name>/`` holding a PEFT
adapter (``adapter_config.json`` + ``adapter_model.safetensors``) and, for training states,
``optimizer.pt``; its metadata (what the listing endpoints report, its owner and TTL) is a
row in the SQLite database, written once the files are complete: a folder without a row
is a save that a crash interrupted, and is never listed. A save is written into
``<data_dir>/staging/`` and renamed into place only once complete, so a failed save (a full
disk, say) leaves nothing behind. Saves are checked against the owner's storage quota
(MAX_STORAGE_BYTES_PER_USER, summed from the rows' sizes) and the disk's room before
writing, and against the quota again with their real size before they are kept. It is named
``tinker://<run_id>/<kind>/<name>``, as the Tinker SDK expects. Kinds: ``weights`` (save_state: weights + optimizer),
``sampler_weights`` (weights for sampling), ``external_weights`` (an export for download).
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from thinker.core.errors import (
    BadRequestError,
    InsufficientStorageError,
    NotFoundError,
    StorageQuotaError,
    ThinkerError,
)
from thinker.core.paths import check_name, path_under
from thinker.store.database import Database
from thinker.store.diskspace import HOW_TO_FREE, DiskReserve, human, is_disk_full

KINDS = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}


@dataclass(frozen=True)
class TinkerPath:
    run_id: str
    kind: str
    name: str

    def __post_init__(self) -> None:
        # However it is made (parsed from a caller's path, or from a model id in a save), a
        # TinkerPath holds plain names only: its parts become folder names (see paths.py).
        check_name(self.run_id, "run id")
        if self.kind not in KINDS:
            raise BadRequestError(f"kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        check_name(self.name, "checkpoint name")

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


@dataclass
class CheckpointInfo:
    """A checkpoint's metadata (a row of the ``checkpoints`` table)."""

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


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


class CheckpointStore:
    def __init__(
        self, data_dir: str | Path, database: Database, reserve: DiskReserve | None = None, quota_bytes: int = 0
    ) -> None:
        """``reserve``: the data disk's (see diskspace.py); ``quota_bytes``: MAX_STORAGE_BYTES_PER_USER (0: none)."""
        self.root = Path(data_dir).resolve() / "checkpoints"
        self.staging = Path(data_dir).resolve() / "staging"
        self.db = database
        self.reserve = reserve or DiskReserve(data_dir, 0)
        self.quota_bytes = quota_bytes
        self._lock = threading.Lock()
        self._expired_at = 0.0
        shutil.rmtree(self.staging, ignore_errors=True)  # saves a crash interrupted
        self._import_legacy()

    def folder(self, path: TinkerPath) -> Path:
        return path_under(self.root, path.run_id, path.kind, path.name, field_name="path")

    def exists(self, path: TinkerPath) -> bool:
        return bool(self.db.query("SELECT 1 FROM checkpoints WHERE tinker_path = ?", (str(path),)))

    def write_info(self, info: CheckpointInfo) -> None:
        """Record a checkpoint whose files are complete (this is what makes it exist)."""
        info.size_bytes = _size(self.folder(TinkerPath.parse(info.tinker_path)))
        self.db.execute(
            "INSERT OR REPLACE INTO checkpoints (tinker_path, run_id, owner, created_at, expires_at, info, size_bytes) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (info.tinker_path, info.run_id, info.owner, info.created_at, info.expires_at, json.dumps(asdict(info)),
             info.size_bytes),
        )

    def used_bytes(self, owner: str | None, besides: TinkerPath | Path | None = None) -> int:
        """Bytes of ``owner``'s checkpoints and exports, ``besides`` (one about to be replaced) left out."""
        besides = str(besides) if besides else None
        rows = self.db.query(
            "SELECT (SELECT COALESCE(SUM(size_bytes), 0) FROM checkpoints WHERE owner IS ? AND tinker_path IS NOT ?)"
            " + (SELECT COALESCE(SUM(size_bytes), 0) FROM exports WHERE owner IS ? AND path IS NOT ?)",
            (owner, besides, owner, besides),
        )
        return rows[0][0]

    def check_room(self, owner: str | None, needed: int, path: TinkerPath | Path, what: str = "") -> None:
        """Refuse a save of about ``needed`` bytes to ``path`` (replacing it, if it exists) before
        anything is written: over the owner's quota (403), or no room on the disk (507)."""
        what = what or f"checkpoint {path}"
        self._check_quota(owner, needed, path, what)
        self.reserve.ensure()  # back in place if deletes made room
        if self.reserve.full or self.reserve.free_bytes() < needed:
            raise InsufficientStorageError(self.reserve.full_message(f"{what} not saved", needed))

    def _check_quota(self, owner: str | None, needed: int, path: TinkerPath | Path, what: str) -> None:
        if not self.quota_bytes:
            return
        used = self.used_bytes(owner, path)
        if used + needed > self.quota_bytes:
            raise StorageQuotaError(
                f"{what} not saved, storage quota exceeded: your checkpoints use {human(used)}, this "
                f"save needs about {human(needed)}, and the limit per user (MAX_STORAGE_BYTES_PER_USER) is "
                f"{human(self.quota_bytes)}; {HOW_TO_FREE}"
            )

    def save(self, info: CheckpointInfo, write: Callable[[Path], None], needed: int) -> None:
        """Write a checkpoint with ``write(folder)`` and record it, replacing one of the same
        path; on any failure nothing of it is kept (and one it replaces stays)."""
        path = TinkerPath.parse(info.tinker_path)
        what = f"checkpoint {path}"
        self.check_room(info.owner, needed, path, what)
        staged = self.staging / secrets.token_hex(8)
        try:
            write(staged)
            final = self.folder(path)
            final.parent.mkdir(parents=True, exist_ok=True)
            with self._lock:  # the quota, with the real size, and the swap: one save at a time
                self._check_quota(info.owner, _size(staged), path, what)
                if self.exists(path):
                    self.delete(path)
                shutil.rmtree(final, ignore_errors=True)  # files of a save a crash interrupted
                os.replace(staged, final)
                try:
                    self.write_info(info)
                except BaseException:
                    shutil.rmtree(final, ignore_errors=True)
                    raise
        except BaseException as exc:
            shutil.rmtree(staged, ignore_errors=True)
            if isinstance(exc, ThinkerError) or not is_disk_full(exc):
                raise
            raise InsufficientStorageError(self.reserve.full_message(f"checkpoint {path} not saved", needed)) from exc

    def save_export(self, owner: str | None, final: Path, write: Callable[[Path], None], needed: int) -> None:
        """Write a PEFT export (the seed API's ``/save_lora``, into ``final``) as a checkpoint is
        written: quota and disk checked first, written aside, renamed into place, nothing left
        on failure; its bytes count against the owner's quota like a checkpoint's. An adapter
        keeps its newest export only (``final``'s siblings go once it is in place), so its
        exports cannot pile up, and ``delete_exports`` frees them."""
        what = f"export {final.name} of {final.parent.name}"
        older = self._exports_in(final.parent)  # replaced by this one once it is in place
        self.check_room(owner, needed - sum(size for path, size in older if path != str(final)), final, what)
        staged = self.staging / secrets.token_hex(8)
        try:
            write(staged)
            final.parent.mkdir(parents=True, exist_ok=True)
            with self._lock:
                self._check_quota(owner, _size(staged), final, what)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(staged, final)
                self.db.execute(
                    "INSERT OR REPLACE INTO exports (path, owner, size_bytes, created_at) VALUES (?, ?, ?, ?)",
                    (str(final), owner, _size(final), time.time()),
                )
                for path, _ in older:
                    if path != str(final):
                        self._drop_export(path)
        except BaseException as exc:
            shutil.rmtree(staged, ignore_errors=True)
            if isinstance(exc, ThinkerError) or not is_disk_full(exc):
                raise
            raise InsufficientStorageError(self.reserve.full_message(f"{what} not saved", needed)) from exc

    def delete_exports(self, folder: Path) -> None:
        """Remove every export under ``folder`` (an adapter's, when it is deleted)."""
        with self._lock:
            for path, _ in self._exports_in(folder):
                self._drop_export(path)
        shutil.rmtree(folder, ignore_errors=True)

    def _exports_in(self, folder: Path) -> list[tuple[str, int]]:
        prefix = f"{folder}{os.sep}"  # (compared as text: LIKE would read "_" in ids as a wildcard)
        return self.db.query(
            "SELECT path, size_bytes FROM exports WHERE substr(path, 1, ?) = ?", (len(prefix), prefix)
        )

    def _drop_export(self, path: str) -> None:
        self.db.execute("DELETE FROM exports WHERE path = ?", (path,))  # the row first, as for a checkpoint
        shutil.rmtree(path, ignore_errors=True)

    def get(self, path: TinkerPath) -> CheckpointInfo:
        self._expire()
        rows = self.db.query("SELECT info FROM checkpoints WHERE tinker_path = ?", (str(path),))
        if not rows:
            raise NotFoundError(not_found(path))
        return CheckpointInfo(**json.loads(rows[0][0]))

    def list(self, run_id: str | None = None) -> list[CheckpointInfo]:
        """Every checkpoint (of one run), oldest first."""
        self._expire()
        if run_id is None:
            rows = self.db.query("SELECT info FROM checkpoints ORDER BY created_at")
        else:
            rows = self.db.query("SELECT info FROM checkpoints WHERE run_id = ? ORDER BY created_at", (run_id,))
        return [CheckpointInfo(**json.loads(info)) for (info,) in rows]

    def update(self, path: TinkerPath, **changes) -> CheckpointInfo:
        with self._lock:
            info = self.get(path)
            for key, value in changes.items():
                setattr(info, key, value)
            self.write_info(info)
        return info

    def delete(self, path: TinkerPath) -> None:
        # The row first: a crash in between leaves files no listing shows, never a listed
        # checkpoint without files.
        if not self.db.execute("DELETE FROM checkpoints WHERE tinker_path = ?", (str(path),)):
            raise NotFoundError(not_found(path))
        shutil.rmtree(self.folder(path), ignore_errors=True)
        self.reserve.ensure()  # the space just freed goes to the reserve first (if it was given up)

    def archive(self, path: TinkerPath) -> bytes:
        """The checkpoint's PEFT adapter as a .tar.gz (adapter_config.json, adapter_model.safetensors)."""
        self.get(path)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                tar.add(self.folder(path) / name, arcname=name)
        return buffer.getvalue()

    def _expire(self) -> None:
        """Delete checkpoints whose TTL ran out (checked once a minute at most)."""
        now = time.time()
        if now - self._expired_at < 60:
            return
        self._expired_at = now
        for (tinker_path,) in self.db.query("SELECT tinker_path FROM checkpoints WHERE expires_at < ?", (now,)):
            self.delete(TinkerPath.parse(tinker_path))

    def _import_legacy(self) -> None:
        """Checkpoints saved by versions that kept their metadata in ``checkpoint.json``."""
        for meta in self.root.glob("*/*/*/checkpoint.json") if self.root.exists() else []:
            try:
                info = CheckpointInfo(**json.loads(meta.read_text()))
            except (OSError, ValueError, TypeError):
                continue
            if not self.exists(TinkerPath.parse(info.tinker_path)):
                self.write_info(info)
            meta.unlink(missing_ok=True)
