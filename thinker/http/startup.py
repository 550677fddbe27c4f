"""What ``python app.py`` claims before it loads or recovers anything: its data dir and its port.

A second server on the same data dir would run restart recovery on the live server's
database (marking its adapters lost and its unfinished futures failed); one on the same
port would load the model and only then fail to bind. So both are claimed first, and a
clash is one clear ``StartupError`` (main() logs it and exits 2) while the other server
is untouched.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import IO

from thinker.core.errors import ConfigurationError

LOCK_FILE = "thinker.lock"


class StartupError(ConfigurationError):
    """The data dir or the port is taken by another process."""


def lock_data_dir(data_dir: str) -> IO[str]:
    """An exclusive lock on ``data_dir``, held while the returned file stays open (the
    kernel drops it when the process exits, however it exits: no stale lock to clean up)."""
    folder = Path(data_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK_FILE, "a+")  # noqa: SIM115 - held for the process lifetime
    except OSError as exc:
        raise StartupError(f"THINKER_DATA_DIR {data_dir!r} cannot be used: {exc.strerror or exc}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise StartupError(
            f"THINKER_DATA_DIR {str(folder.resolve())!r} is in use by another thinker server (pid {holder}); "
            "stop it, or give this one its own THINKER_DATA_DIR"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (handed to waitress later). Listening at once, not
    only binding: on Linux two SO_REUSEADDR sockets may bind one port while neither listens.
    Connections made while the model loads wait in the backlog."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise StartupError(f"HOST {host!r} cannot be resolved: {exc}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may rebind at once
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(
                f"port {port} on {host} is already in use (another server listens there); "
                "stop it, or set PORT to a free port"
            ) from None
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock
