"""Wake-ups between processes, so that nobody busy-polls the database.

Two channels: ``jobs`` (a job was queued: workers, wake up) and ``done`` (a job ended; the payload
is its id: sync-mode waiters and the webhook dispatcher, wake up). A notification is only a hint:
every waiter also polls at a slow interval, so a lost one costs latency, never a job.

- ``LocalNotifier``: processes on one machine (the embedded SQLite default). Each subscriber binds a
  Unix datagram socket in ``run_dir/<channel>/``; publishing sends one datagram to each.
- ``PostgresNotifier``: LISTEN/NOTIFY, for any number of machines on one PostgreSQL.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import select
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import structlog

log = structlog.get_logger(__name__)

CHANNELS = ("jobs", "done")


class Subscription(Protocol):
    def wait(self, timeout: float) -> list[str]:
        """Block up to ``timeout`` seconds; return the payloads received (empty on timeout)."""

    def wake(self) -> None:
        """Make a ``wait`` in another thread return now (to stop its loop without waiting it out)."""

    def close(self) -> None: ...


class Notifier(Protocol):
    def publish(self, channel: str, payload: str = "") -> None: ...

    def subscribe(self, channel: str) -> Subscription: ...


class NullNotifier:
    """No wake-ups at all: waiters fall back to polling."""

    def publish(self, channel: str, payload: str = "") -> None:
        return None

    def subscribe(self, channel: str) -> Subscription:
        return _SleepSubscription()


class _SleepSubscription:
    def __init__(self) -> None:
        self._closed = threading.Event()

    def wait(self, timeout: float) -> list[str]:
        self._closed.wait(timeout)
        return []

    def wake(self) -> None:
        self._closed.set()

    def close(self) -> None:
        self._closed.set()


# --- one machine: Unix datagram sockets ----------------------------------------------------------


def _socket_dir(run_dir: Path) -> Path:
    # AF_UNIX paths are limited to 108 bytes: fall back to a short, stable folder under /tmp.
    if len(str(run_dir)) <= 60:
        return run_dir
    digest = hashlib.sha256(str(run_dir).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"qwen-edit-{digest}"


class LocalNotifier:
    def __init__(self, run_dir: Path) -> None:
        self.root = _socket_dir(run_dir)

    def publish(self, channel: str, payload: str = "") -> None:
        folder = self.root / channel
        try:
            entries = list(folder.iterdir())
        except FileNotFoundError:
            return
        data = payload.encode()[:1024]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            for path in entries:
                try:
                    sock.sendto(data, str(path))
                except (ConnectionRefusedError, FileNotFoundError):
                    # Its owner died without cleaning up.
                    with contextlib.suppress(OSError):
                        path.unlink()
                except (BlockingIOError, OSError):
                    pass  # a full queue already holds a wake-up for that subscriber

    def subscribe(self, channel: str) -> Subscription:
        return _LocalSubscription(self.root / channel)


class _LocalSubscription:
    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{os.getpid()}-{secrets.token_hex(4)}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)

    def wait(self, timeout: float) -> list[str]:
        try:
            ready, _, _ = select.select([self.sock], [], [], timeout)
        except (OSError, ValueError):  # closed under us
            return []
        payloads: list[str] = []
        while ready:
            try:
                payloads.append(self.sock.recv(1024).decode(errors="replace"))
            except (BlockingIOError, OSError):
                break
        return payloads

    def wake(self) -> None:
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"", str(self.path))

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


# --- many machines: PostgreSQL LISTEN/NOTIFY ------------------------------------------------------


class PostgresNotifier:
    def __init__(self, dsn: str, publish: Callable[[str, str], None]) -> None:
        # ``dsn`` is a libpq URL (postgresql://…); ``publish`` runs pg_notify on the store's pool.
        self.dsn = dsn
        self._publish = publish

    def publish(self, channel: str, payload: str = "") -> None:
        self._publish(f"qwen_edit_{channel}", payload)

    def subscribe(self, channel: str) -> Subscription:
        return _PostgresSubscription(self.dsn, f"qwen_edit_{channel}")


class _PostgresSubscription:
    def __init__(self, dsn: str, channel: str) -> None:
        self.dsn = dsn
        self.channel = channel
        self.conn: Any = None
        self._closed = threading.Event()

    def _connect(self):  # type: ignore[no-untyped-def]
        import psycopg

        conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
        conn.execute(f"LISTEN {self.channel}")
        return conn

    def wait(self, timeout: float) -> list[str]:
        if self._closed.is_set():
            return []
        try:
            if self.conn is None:
                self.conn = self._connect()
            return [n.payload for n in self.conn.notifies(timeout=timeout, stop_after=64)]
        except Exception as exc:  # database restarting: poll until it is back
            log.debug("listen connection lost", channel=self.channel, error=str(exc))
            self._drop()
            self._closed.wait(min(timeout, 1.0))
            return []

    def wake(self) -> None:
        pass  # notifies() returns within its timeout (0.5 s at most where this is used)

    def _drop(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None

    def close(self) -> None:
        self._closed.set()
        self._drop()
