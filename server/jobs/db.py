"""The database under the job store: one engine, its pragmas, migrations under a lock, the notifier,
and the one place where the driver's errors become the store's own ``StoreUnavailable``.

SQLite runs in WAL mode with the driver in autocommit and transactions begun here: reads begin a
deferred transaction (a consistent snapshot, concurrent with a writer), writes ``BEGIN IMMEDIATE``
(the write lock first, waited for under ``busy_timeout``), so that a read-then-write transaction
such as the queue cap's count-and-insert is atomic and never fails half-way on a lock upgrade.
"""

from __future__ import annotations

import contextlib
import fcntl
import select as io_select
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import Connection, CursorResult, Engine, create_engine, event, func, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.sql import ClauseElement

from server.errors import StoreUnavailable, first_line
from server.jobs import statements as sql
from server.jobs.driver import DriverResult, DriverStatement
from server.jobs.notify import LocalNotifier, Notifier, NullNotifier, PostgresNotifier

if TYPE_CHECKING:
    from server.settings import Settings

log = structlog.get_logger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
_WRITE = "qwen_edit_write"  # execution option: this connection's transaction writes

# The driver errors that mean "the database cannot be reached or written right now" (a restart,
# a full disk, a lock held too long, a refused connection), as opposed to a bug in a statement.
UNAVAILABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, sa_exc.DisconnectionError)


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # transactions are begun by _sqlite_begin, not the driver
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")
    # Switching a new database to WAL takes an exclusive lock, and SQLite answers a second process
    # racing to switch it (an API and its worker starting together) with "database is locked" at
    # once, without its busy wait. The switch is persistent and quick: retry until it is done.
    deadline = time.monotonic() + 30
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _pg_checkout(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
    """Refuse a pooled connection the server has already closed (a restart, an admin, a proxy).

    An idle pooled connection has nothing to read: the server only writes to it in answer to a
    query. If its socket is readable, the server said goodbye (a termination notice, then EOF).
    Checking that is one non-blocking poll (about a microsecond), where pool_pre_ping would be a
    round trip on every request. DisconnectionError makes the pool discard it and connect anew,
    so the first request after a database restart succeeds instead of failing on a dead socket.
    """
    pgconn = getattr(dbapi_conn, "pgconn", None)
    if pgconn is None:  # another driver than psycopg 3: nothing cheap to look at
        return
    try:
        readable = bool(io_select.select([pgconn.socket], [], [], 0)[0])
    except Exception:  # a socket already closed on our side
        readable = True
    if readable:
        raise sa_exc.DisconnectionError("the database closed this pooled connection")


def _sqlite_begin(conn: Connection) -> None:
    # Straight to the driver: SQLAlchemy's own execution of two fixed words (a context, a cursor,
    # a result, their events) cost as much as the statement the transaction is for.
    sql = "BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN"
    conn.connection.driver_connection.execute(sql)  # type: ignore[union-attr]


class Database:
    """An engine on SQLite or PostgreSQL, with ``read()`` / ``write()`` transactions."""

    def __init__(self, url: str, *, run_dir: Path | None = None, pool_size: int = 10) -> None:
        self.url: URL = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self.is_postgres = self.url.get_backend_name() == "postgresql"
        if self.is_sqlite:
            if self.url.database and self.url.database != ":memory:":
                Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
            event.listen(self.engine, "connect", _sqlite_connect)
            event.listen(self.engine, "begin", _sqlite_begin)
        else:
            # No pool_pre_ping: it costs a round trip on every checkout, i.e. on every request.
            # _pg_checkout finds connections the server closed without one. A connection cut
            # between checkout and its first statement still fails that statement: SQLAlchemy then
            # invalidates the whole pool, that one call is StoreUnavailable (a 503, a worker's
            # retry). pool_recycle retires connections before idle timeouts of proxies can cut them.
            self.engine = create_engine(
                url, pool_recycle=300, pool_size=pool_size, max_overflow=pool_size, pool_timeout=10
            )
            event.listen(self.engine, "checkout", _pg_checkout)
        # PostgreSQL: connections of the same pool in autocommit, for reads and for writes of one
        # statement (see read() and write_one()).
        self._lone: Engine | None = (
            self.engine.execution_options(isolation_level="AUTOCOMMIT") if self.is_postgres else None
        )
        # run(): each statement compiled for this dialect, or None where SQLAlchemy must run it.
        self._driver: dict[ClauseElement, DriverStatement | None] = {}
        self.notifier: Notifier
        if self.is_postgres:
            dsn = self.url.set(drivername="postgresql").render_as_string(hide_password=False)
            self.notifier = PostgresNotifier(dsn, self._pg_notify)
        elif run_dir is not None:
            self.notifier = LocalNotifier(run_dir)
        else:
            self.notifier = NullNotifier()

    @classmethod
    def open(cls, settings: Settings, *, pool_size: int = 10) -> Database:
        return cls(settings.resolved_database_url, run_dir=settings.run_dir, pool_size=pool_size)

    @property
    def backend(self) -> str:
        return self.url.get_backend_name()

    def close(self) -> None:
        self.engine.dispose()

    # --- transactions --------------------------------------------------------------------

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """Reads. SQLite: one read transaction, a snapshot across its statements (rolled back at the
        end). PostgreSQL: autocommit. At READ COMMITTED, PostgreSQL's default, each statement reads
        its own snapshot inside a transaction too, so BEGIN and ROLLBACK would only add two round
        trips to each read (a lone read's three)."""
        with translated(), (self._lone or self.engine).connect() as conn:
            yield conn

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction, committed when the block ends without an error."""
        with translated(), self.engine.connect() as conn:
            if self.is_sqlite:
                conn = conn.execution_options(**{_WRITE: True})
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def write_one(self) -> Iterator[Connection]:
        """A write of ONE statement, atomic by itself (a claim, a lease's renewal, a job's end).
        PostgreSQL runs it in autocommit: one round trip where BEGIN, the statement and COMMIT took
        three. SQLite: ``write()`` (BEGIN IMMEDIATE: the write lock first, never a failed upgrade)."""
        if self._lone is None:
            with self.write() as conn:
                yield conn
            return
        with translated(), self._lone.connect() as conn:
            yield conn

    def run(
        self, conn: Connection, statement: ClauseElement, values: dict[str, Any]
    ) -> DriverResult | CursorResult[Any]:
        """One of the hottest statements (a submit, a claim, a job's end, a result read) on ``conn``'s
        driver cursor, compiled once (server/jobs/driver.py says why and what is kept); one that
        cannot run there (an ``IN`` list) through SQLAlchemy."""
        try:
            compiled = self._driver[statement]
        except KeyError:  # a race compiles it twice: the same text, once kept
            compiled = self._driver[statement] = DriverStatement.of(statement, self.engine.dialect)
        if compiled is None:
            return conn.execute(statement, values)  # type: ignore[call-overload]
        return compiled.run(conn, values)

    def ping(self) -> None:
        with self.read() as conn:
            conn.execute(text("SELECT 1"))

    def publish(self, channel: str, payload: str = "") -> None:
        """Wake whoever waits on ``channel``: a hint only (waiters poll anyway), so it never raises."""
        try:
            self.notifier.publish(channel, payload)
        except Exception as exc:
            log.warning("notify failed", channel=channel, error=first_line(exc))

    def publish_on_commit(self, conn: Connection, channel: str, payload: str = "") -> bool:
        """PostgreSQL: NOTIFY inside the caller's transaction (delivered at its commit: one statement,
        no transaction of its own); True when done so, False when the caller should ``publish``
        after its commit."""
        if not isinstance(self.notifier, PostgresNotifier):
            return False
        wake = self.wake_params(channel, payload)
        if wake is not None:
            conn.execute(sql.WAKE_ONE, wake)
        else:
            conn.execute(select(func.pg_notify(self.notifier.channel(channel), payload)))
        return True

    def wake_params(self, channel: str, payload: str) -> dict[str, str] | None:
        """PostgreSQL: the parameters of a wake-one NOTIFY (statements.WAKE_ONE, SUBMIT) for
        ``channel`` and ``payload``; None where the message is for everyone or the notifier is not
        PostgreSQL's."""
        if not isinstance(self.notifier, PostgresNotifier) or not self.notifier.wakes_one(channel, payload):
            return None
        return {"topic": payload, "shared": self.notifier.channel(channel), "payload": payload}

    def _pg_notify(self, channel: str, payload: str) -> None:
        with self.write_one() as conn:  # one statement (WAKE_ONE's CTE, or pg_notify)
            self.publish_on_commit(conn, channel, payload)

    # --- schema --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _migration_lock(self, conn: Connection) -> Iterator[None]:
        """One migrator at a time, held until its migration is committed: the next one then reads
        the new schema version instead of racing to create the same tables."""
        if self.is_postgres:
            # A transaction-level lock: released by the commit (or the rollback), never before.
            conn.execute(text("SELECT pg_advisory_xact_lock(727001)"))
            yield
        elif self.is_sqlite and self.url.database and self.url.database != ":memory:":
            with open(Path(self.url.database).with_suffix(".migrate.lock"), "w") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                yield
        else:
            yield

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (safe from many processes at once)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.write() as conn, self._migration_lock(conn):
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def wait_until_migrated(self, stop: Any = None, max_delay_s: float = 30.0) -> bool:
        """``migrate()``, retried with backoff while the database is unavailable (a process that
        starts before its database must wait for it, not die). False when ``stop`` was set."""
        delay = 1.0
        while True:
            try:
                self.migrate()
                return True
            except StoreUnavailable as exc:
                log.warning("job store unavailable at start-up; retrying", error=str(exc), retry_in_s=delay)
            if stop is not None and stop.wait(delay):
                return False
            if stop is None:
                time.sleep(delay)
            delay = min(max_delay_s, delay * 2)


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Driver errors that mean "unavailable" leave as ``StoreUnavailable``; anything else is a bug."""
    try:
        yield
    except UNAVAILABLE as exc:
        orig = getattr(exc, "orig", None)  # the driver's own error, without SQLAlchemy's statement dump
        raise StoreUnavailable(first_line(orig if isinstance(orig, BaseException) else exc)) from exc
