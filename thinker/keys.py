"""Make, list and revoke API keys in the server's database (THINKER_DATA_DIR/thinker.db).

    python -m thinker.keys create alice   # prints a new key once; only its SHA-256 digest is stored
    python -m thinker.keys list           # labels, owner ids and where each key came from
    python -m thinker.keys revoke alice   # that key stops working at once

A running server sees new and revoked keys immediately. If it started with no keys at all
(open single-user mode), keys take effect at its next start. ``pip install -e .`` also
installs this as the ``thinker-keys`` command.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from thinker.core.config import Config
from thinker.http.auth import digest, owner_id
from thinker.store.database import Database


def create(db: Database, label: str) -> str:
    if db.query("SELECT 1 FROM api_keys WHERE label = ?", (label,)):
        raise SystemExit(f"a key labelled {label!r} exists already; revoke it first or choose another label")
    key = "tml-" + secrets.token_urlsafe(32)
    d = digest(key)
    db.execute(
        "INSERT INTO api_keys (digest, owner, label, source, created_at) VALUES (?, ?, ?, 'cli', ?)",
        (d, owner_id(d), label, time.time()),
    )
    return key


def revoke(db: Database, label: str) -> int:
    return db.execute("DELETE FROM api_keys WHERE label = ? AND source = 'cli'", (label,))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("create", help="make a key").add_argument("label")
    commands.add_parser("list", help="list the keys (never the keys themselves)")
    commands.add_parser("revoke", help="revoke a key made here").add_argument("label")
    args = parser.parse_args(argv)
    db = Database(Path(Config.from_env().thinker_data_dir) / "thinker.db")
    if args.command == "create":
        key = create(db, args.label)
        print(f"API key for {args.label} (shown once; send it as X-API-Key or TINKER_API_KEY):\n{key}")
    elif args.command == "list":
        rows = db.query("SELECT label, owner, source, created_at FROM api_keys ORDER BY created_at")
        for label, owner, source, created in rows:
            when = datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%d %H:%M")
            print(f"{label or '(from config)':20} {owner}  {source:6} {when}")
        if not rows:
            print("no keys: the server runs in open single-user mode")
    elif not revoke(db, args.label):
        sys.exit(f"no key labelled {args.label!r} was made with thinker.keys")
    else:
        print(f"revoked {args.label}")


if __name__ == "__main__":
    main()
