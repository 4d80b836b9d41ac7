"""Wake-ups between processes, so that nobody busy-polls the database.

Two channels: ``jobs`` (a job was queued: workers, wake up) and ``done`` (a job ended; the payload
is its id and what its end wrote: sync-mode waiters and the webhook dispatcher, wake up). A
notification is only a hint: every waiter also polls at a slow interval, so a lost one costs
latency, never a job (a handoff lost with its worker too: its short lease runs out, and the reaper
queues the job again).

- ``LocalNotifier``: processes on one machine (the embedded SQLite default). Each subscriber binds a
  Unix datagram socket in ``run_dir/<channel>/``; publishing sends one datagram to each, except on
  ``jobs`` with a topic (the job's variant): one queued job needs one worker, so it wakes ONE idle
  subscriber of that topic (woken all, every idle worker raced to claim it: N write transactions
  per submit, all but one for nothing). A subscriber's socket name says whether it is waiting
  (``idle.``) and for which topic; with none idle, every busy one gets the datagram, which its next
  wait returns at once (a worker between an empty claim and its wait is busy: it cannot miss it).
- ``PostgresNotifier``: LISTEN/NOTIFY, for any number of machines on one PostgreSQL. A NOTIFY reaches
  every listener of its channel, so wake-one needs a channel per waiter: a worker waiting for jobs
  LISTENs on its own channel too and, while it waits, has a row in ``idle_waiters`` (an unlogged
  table). A submit takes one such row of its variant (``FOR UPDATE SKIP LOCKED``: two submits never
  pick the same worker) and notifies that worker's channel, in the submit's own transaction (no extra
  round trip); with none idle it notifies the shared channel, which every worker reads at its next
  wait. A row whose listening connection is gone (its worker died) is never picked, and is removed
  by the next worker to connect. A worker's row names it (``owner``): a submit that picks it hands
  it the job itself, leased to it in the submit's statement (``contract.Handoff``), so that it
  starts without a claim (server/worker/inbox.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import secrets
import select
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import structlog

from server.jobs.contract import MAX_MESSAGE_BYTES

log = structlog.get_logger(__name__)

CHANNELS = ("jobs", "done")  # a ``done`` message is server/jobs/contract.py's ``Done``
WAKE_ONE = frozenset({"jobs"})  # channels where one waiter per message is enough (given a topic)
_TOPIC = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class Subscription(Protocol):
    """Listening from construction: a message published after ``subscribe()`` returned is heard
    (while the channel's transport is up), even if it comes before the first ``wait``."""

    def wait(self, timeout: float, *, ready: bool = True) -> list[str]:
        """Block up to ``timeout`` seconds; return the payloads received (empty on timeout).
        ``ready=False``: this waiter would not take any new job now (a worker waiting for jobs to
        batch with the one it holds): a wake-one publisher should pick another."""

    def wake(self) -> None:
        """Make a ``wait`` in another thread return now (to stop its loop without waiting it out)."""

    def close(self) -> None: ...


@runtime_checkable
class Readable(Protocol):
    """A subscription an event loop can watch itself (a local socket, a LISTEN connection): when its
    ``fileno`` is readable, ``drain`` returns what came, at once. No thread sits between a message
    and the loop. ``fileno`` raises OSError while there is nothing to watch (a database that was
    down), ``drain`` when the connection is lost: a thread that waits (and reconnects) takes over."""

    def fileno(self) -> int: ...

    def drain(self) -> list[str]: ...


class Notifier(Protocol):
    def publish(self, channel: str, payload: str = "") -> None: ...

    def subscribe(self, channel: str, topic: str = "", *, owner: str | None = None) -> Subscription:
        """Listen on ``channel``; ``topic``: the payloads this subscriber serves ("": any). ``owner``:
        the id of the worker that waits, to which a submit may hand its job (``contract.Handoff``,
        PostgreSQL only): its waits may return handoffs, which it must run or release."""


class NullNotifier:
    """No wake-ups at all: waiters fall back to polling."""

    def publish(self, channel: str, payload: str = "") -> None:
        return None

    def subscribe(self, channel: str, topic: str = "", *, owner: str | None = None) -> Subscription:
        return _SleepSubscription()


class _SleepSubscription:
    def __init__(self) -> None:
        self._closed = threading.Event()

    def wait(self, timeout: float, *, ready: bool = True) -> list[str]:
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
        data = payload.encode()[:MAX_MESSAGE_BYTES]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            if channel in WAKE_ONE and _TOPIC.match(payload):
                entries = [path for path in entries if _topic_of(path) in ("*", payload)]
                idle = [path for path in entries if path.name.startswith("idle.")]
                random.shuffle(idle)  # spread the work over the idle ones
                if any(_send(sock, path, data) for path in idle):
                    return  # stops at the first delivered
                entries = [path for path in entries if path not in idle]
            for path in entries:
                _send(sock, path, data)

    def subscribe(self, channel: str, topic: str = "", *, owner: str | None = None) -> Subscription:
        # No handoffs here: a local publisher picks its waiter after the submit's commit.
        return _LocalSubscription(self.root / channel, topic if _TOPIC.match(topic) else "*", channel in WAKE_ONE)


def _topic_of(path: Path) -> str:
    parts = path.name.split(".")
    return parts[1] if len(parts) > 3 else "*"


def _send(sock: socket.socket, path: Path, data: bytes) -> bool:
    """One datagram to one subscriber; False when it did not arrive."""
    try:
        sock.sendto(data, str(path))
        return True
    except ConnectionRefusedError:
        # Its owner died without cleaning up.
        with contextlib.suppress(OSError):
            path.unlink()
    except FileNotFoundError:
        pass  # renamed (it went busy or idle) or closed since the listing
    except (BlockingIOError, OSError):
        return True  # a full queue already holds a wake-up for that subscriber
    return False


class _LocalSubscription:
    def __init__(self, folder: Path, topic: str, wake_one: bool) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        # Only a wake-one publisher reads the idle/busy state: elsewhere its two renames a wait
        # would sit between a message's arrival and its delivery for nothing.
        self._marks = wake_one
        # busy|idle . topic . pid-random . sock: a rename flips the state; senders resolve the name
        # to the socket when they send, so a datagram reaches it under either name.
        self._name = f"{topic}.{os.getpid()}-{secrets.token_hex(4)}.sock"
        self.path = folder / f"busy.{self._name}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)
        self._lock = threading.Lock()  # wait() and close() may run on different threads

    def _mark(self, state: str) -> None:
        if not self._marks:
            return
        with self._lock:
            target = self.path.with_name(f"{state}.{self._name}")
            if target != self.path and self.sock.fileno() >= 0:
                with contextlib.suppress(OSError):
                    self.path.rename(target)
                    self.path = target

    def wait(self, timeout: float, *, ready: bool = True) -> list[str]:
        if ready:
            self._mark("idle")
        try:
            readable, _, _ = select.select([self.sock], [], [], timeout)
        except (OSError, ValueError):  # closed under us
            return []
        finally:
            self._mark("busy")
        return self.drain() if readable else []

    def fileno(self) -> int:
        """The socket, for an event loop to watch (``Readable``) instead of a thread that waits."""
        return self.sock.fileno()

    def drain(self) -> list[str]:
        """The messages already here, without waiting."""
        payloads: list[str] = []
        while True:
            try:
                payloads.append(self.sock.recv(MAX_MESSAGE_BYTES).decode(errors="replace"))
            except (BlockingIOError, OSError):
                return payloads

    def wake(self) -> None:
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"", str(self.path))

    def close(self) -> None:
        with self._lock:
            self.sock.close()
            with contextlib.suppress(OSError):
                self.path.unlink()


# --- many machines: PostgreSQL LISTEN/NOTIFY ------------------------------------------------------

# The submitter's side of wake-one is a statement of the job store's (statements.WAKE_ONE, SUBMIT).
_IDLE = (
    "INSERT INTO idle_waiters (channel, topic, pid, since, owner) VALUES (%s, %s, pg_backend_pid(), %s, %s) "
    "ON CONFLICT (channel) DO UPDATE SET topic = excluded.topic, pid = excluded.pid, since = excluded.since, "
    "owner = excluded.owner"
)
_BUSY = "DELETE FROM idle_waiters WHERE channel = %s"
# How long a wait that found its idle row taken waits for the taker's message (it comes within
# milliseconds; a handoff not heard is queued again by the reaper once its lease runs out).
OWED_MESSAGE_S = 5.0
# Rows of listeners whose connection is gone (their worker died): a new listener clears them.
_FORGET_DEAD = "DELETE FROM idle_waiters WHERE pid NOT IN (SELECT pid FROM pg_stat_activity WHERE pid IS NOT NULL)"


class PostgresNotifier:
    def __init__(self, dsn: str, publish: Callable[[str, str], None]) -> None:
        # ``dsn`` is a libpq URL (postgresql://…); ``publish`` runs the NOTIFY on the store's pool.
        self.dsn = dsn
        self._publish = publish

    @staticmethod
    def channel(name: str) -> str:
        return f"qwen_edit_{name}"

    @staticmethod
    def wakes_one(channel: str, payload: str) -> bool:
        """Whether a message picks one idle waiter (statements.WAKE_ONE) rather than reaching all."""
        return channel in WAKE_ONE and bool(_TOPIC.match(payload))

    def publish(self, channel: str, payload: str = "") -> None:
        self._publish(channel, payload)

    def subscribe(self, channel: str, topic: str = "", *, owner: str | None = None) -> Subscription:
        own_topic = (topic if _TOPIC.match(topic) else "*") if channel in WAKE_ONE else None
        return _PostgresSubscription(self.dsn, self.channel(channel), own_topic, owner)


class _PostgresSubscription:
    def __init__(self, dsn: str, channel: str, topic: str | None, owner: str | None = None) -> None:
        self.dsn = dsn
        self.channel = channel
        self.topic = topic  # None: no wake-one, the shared channel only
        self.owner = owner  # on its idle row: a submit that picks it hands it the job
        # Unquoted identifiers fold to lower case, so the name is lower case from the start.
        self.own = f"{channel}_{secrets.token_hex(6)}" if topic is not None else None
        self.conn: Any = None
        self._closed = threading.Event()
        # wake() writes here: a wait watches it beside the connection (a NOTIFY to make a wait
        # return took a connection of its own, opened and closed each time).
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_lock = threading.Lock()
        # LISTEN now, not at the first wait: what is published between subscribe() and that wait
        # would be lost. A database that is down is retried by wait().
        try:
            self.conn = self._connect()
        except Exception as exc:
            log.debug("listen connection not made", channel=channel, error=str(exc))

    def _connect(self):  # type: ignore[no-untyped-def]
        import psycopg

        conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
        conn.execute(f"LISTEN {self.channel}")
        if self.own is not None:
            conn.execute(f"LISTEN {self.own}")
            try:
                conn.execute(_FORGET_DEAD)
            except psycopg.errors.UndefinedTable:  # a store not migrated yet: everyone hears everything
                log.warning("no idle_waiters table: every idle worker is woken", channel=self.channel)
                self.own = None
        return conn

    def wait(self, timeout: float, *, ready: bool = True) -> list[str]:
        if self._closed.is_set():
            return []
        try:
            if self.conn is None:
                self.conn = self._connect()
            idle = ready and self.own is not None
            if idle:
                self.conn.execute(_IDLE, (self.own, self.topic, int(time.time() * 1000), self.owner))
            got: list[Any] = []
            try:
                # What already came (read with an earlier statement's answer) first; else wait for
                # the connection or a wake(), whichever is first, and take what came.
                got = list(self.conn.notifies(timeout=0, stop_after=64))
                if not got:
                    readable = select.select([self.conn.fileno(), self._wake_r], [], [], timeout)[0]
                    if self._wake_r in readable:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                    got = list(self.conn.notifies(timeout=0, stop_after=64))
            finally:
                # Busy from here. A job's message on its own channel came from a submitter that
                # removed its row already: no round trip to remove it (it sat before the claim).
                # wake()'s empty one did not.
                if idle and not self._told(got):
                    got += self._busy()
            return [n.payload for n in got]
        except Exception as exc:  # database restarting: poll until it is back
            log.debug("listen connection lost", channel=self.channel, error=str(exc))
            self._drop()
            self._closed.wait(min(timeout, 1.0))
            return []

    def _told(self, got: list[Any]) -> bool:
        """Whether ``got`` holds the message of a submitter that picked this waiter's row."""
        return any(n.channel == self.own and n.payload for n in got)

    def _busy(self) -> list[Any]:
        """Remove this waiter's row; what came meanwhile. Where the row was gone already, a
        submitter picked it and committed (the DELETE waited for its lock, or saw its commit): its
        message, a handoff maybe, is owed to this wait. PostgreSQL signals a NOTIFY's listeners only
        after its transaction has released its locks and become visible, so that message may still
        be on its way (measured: 21 times in 1000 on an idle machine). It is waited for here: left
        for a later wait, a handoff sat unread, its job leased to a worker busy with others until the
        lease ran out and the reaper queued it again, an attempt spent for nothing."""
        picked = self.conn.execute(_BUSY, (self.own,)).rowcount == 0
        got = list(self.conn.notifies(timeout=0, stop_after=64))
        deadline = time.monotonic() + OWED_MESSAGE_S
        while picked and not self._told(got) and (left := deadline - time.monotonic()) > 0:
            got += self.conn.notifies(timeout=left, stop_after=1)
        if picked and not self._told(got):
            log.warning("a submitter took this worker's idle row but its message never came", channel=self.own)
        return got

    def fileno(self) -> int:
        """The LISTEN connection's socket, for an event loop to watch (``Readable``)."""
        if self.conn is None or self.conn.closed:
            raise OSError("no LISTEN connection")
        return int(self.conn.fileno())

    def drain(self) -> list[str]:
        """The notifications already here, without waiting; raises when the connection is lost."""
        if self.conn is None:
            raise OSError("no LISTEN connection")
        return [n.payload for n in self.conn.notifies(timeout=0)]

    def wake(self) -> None:
        """Make a wait return now (it returns what came meanwhile, maybe nothing)."""
        with self._wake_lock:  # never a write to a descriptor close() just gave back
            if not self._closed.is_set():
                with contextlib.suppress(OSError):  # full: a wake is pending already
                    self._wake_w.send(b"w")

    def _drop(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None

    def close(self) -> None:
        with self._wake_lock:
            if self._closed.is_set():
                return
            self._closed.set()
            self._wake_w.close()
        self._drop()
        # The read end stays open for a wait that may be running on another thread (closing it
        # under select() is undefined); it is closed with the object.
