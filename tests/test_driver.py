"""The hot statements on the driver's cursor (server/jobs/driver.py): the same rows, the same errors
and the same events as SQLAlchemy's own execution of them, on both databases."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from sqlalchemy import event
from sqlalchemy import exc as sa_exc

from benchmarks.jobs import store_job
from server.errors import StoreUnavailable
from server.jobs import statements as sql
from server.jobs.driver import DriverStatement
from server.jobs.models import jobs
from server.jobs.store import JobStore
from server.settings import Settings


def finished_job(store: JobStore) -> str:
    """A job with every kind of column filled: JSON (params, outputs, nsfw), booleans, integers."""
    job = store_job(variant="edit", input={"prompt": "p", "image": "x"}, base_url="http://h", steps=3)
    store.create(job)
    claimed = store.claim("w/0", ["edit"], 30)
    assert claimed is not None and claimed.lease_token
    assert store.complete(job.id, claimed.lease_token, [f"outputs/{job.id}/0.png"], 12, 3, [True])
    return job.id


def test_a_row_read_on_the_driver_is_the_row_sqlalchemy_reads(store: JobStore) -> None:
    job_id = finished_job(store)
    with store.db.read() as conn:
        through_core = conn.execute(sql.GET_JOB, {"job_id": job_id}).first()
        on_driver = store.db.run(conn, sql.GET_JOB, {"job_id": job_id}).first()
    assert through_core is not None and on_driver is not None
    assert dict(on_driver._mapping) == dict(through_core._mapping)
    assert on_driver.outputs == [f"outputs/{job_id}/0.png"] and on_driver.nsfw == [True]
    assert on_driver.base64_output is False and on_driver.cancel_requested is False  # booleans, not 0
    assert tuple(on_driver) == tuple(through_core)


def test_a_row_count_and_no_rows(store: JobStore) -> None:
    job_id = finished_job(store)
    with store.db.read() as conn:
        result = store.db.run(conn, sql.GET_JOB, {"job_id": "nothing"})
        assert result.first() is None and result.all() == []
        with pytest.raises(sa_exc.NoResultFound):
            store.db.run(conn, sql.GET_JOB, {"job_id": "nothing"}).scalar_one()
    with store.db.write() as conn:
        params = {"job_id": job_id, "token": "gone", "now": 1, "b_outputs": [], "b_inference_ms": 1, "steps": None}
        ended = store.db.run(conn, sql.END_LEASED["complete", False], {**params, "b_nsfw": None})
    assert ended.rowcount == 0 and ended.first() is None  # a lost lease: nothing written


def test_a_driver_error_is_the_error_sqlalchemy_raises(store: JobStore) -> None:
    """The driver's error is SQLAlchemy's (IntegrityError here, its ``orig`` the driver's own, with
    PostgreSQL's SQLSTATE), and the transaction it broke is rolled back whole."""
    job = store_job(variant="edit", input={}, base_url="", steps=1)
    store.create(job)
    other = store_job(variant="edit", input={}, base_url="", steps=1)
    with pytest.raises(sa_exc.IntegrityError) as raised, store.db.write() as conn:
        store.db.run(conn, sql.INSERT_JOB, other.to_row())
        store.db.run(conn, sql.INSERT_JOB, job.to_row())  # the same id again
    if store.db.is_postgres:
        assert getattr(raised.value.orig, "sqlstate", None) == "23505"  # unique_violation
    assert store.get(other.id) is None  # the first insert went with the transaction
    assert store.get(job.id) is not None


def test_a_connection_lost_mid_call_is_store_unavailable_and_never_reused(pg_url: str) -> None:
    """A connection cut after its checkout (a database restart between two statements): the call
    is StoreUnavailable, and the pool discards that connection, so the next call reconnects."""
    store = JobStore.open(Settings(database_url=pg_url), pool_size=1)
    store.migrate()
    try:
        job_id = finished_job(store)
        with pytest.raises(StoreUnavailable), store.db.read() as conn:
            pid = conn.connection.driver_connection.info.backend_pid  # type: ignore[union-attr]
            with psycopg.connect(pg_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            store.db.run(conn, sql.GET_JOB, {"job_id": job_id})
        got = store.get(job_id)
        assert got is not None and got.id == job_id
    finally:
        store.close()


def test_an_in_list_runs_through_sqlalchemy(store: JobStore) -> None:
    """A statement whose SQL changes with its list's length cannot be compiled once: run() leaves it
    to SQLAlchemy, with the same results."""
    queued = store_job(variant="edit-plus", input={}, base_url="", steps=1)
    store.create(queued)
    statement = sql.QUEUED_ANY["variants"]
    assert DriverStatement.of(statement, store.db.engine.dialect) is None
    assert DriverStatement.of(sql.QUEUED_ANY["variant"], store.db.engine.dialect) is not None
    with store.db.read() as conn:
        assert store.db.run(conn, statement, {"variants": ["edit", "edit-plus"]}).first() == (queued.id,)
        assert store.db.run(conn, statement, {"variants": ["edit"]}).first() is None


def test_the_engines_listeners_see_each_driver_statement(store: JobStore) -> None:
    """Tracing (and the tests that read plans) hook the engine's cursor events: they see the SQL and
    the parameters the driver got, before and after it ran."""
    seen: list[tuple[str, str, Any]] = []

    def before(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        seen.append(("before", statement, parameters))

    def after(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        seen.append(("after", statement, parameters))

    event.listen(store.db.engine, "before_cursor_execute", before)
    event.listen(store.db.engine, "after_cursor_execute", after)
    try:
        assert store.get("nothing") is None
    finally:
        event.remove(store.db.engine, "before_cursor_execute", before)
        event.remove(store.db.engine, "after_cursor_execute", after)
    compiled = DriverStatement(sql.GET_JOB, store.db.engine.dialect)
    assert [(when, statement) for when, statement, _ in seen] == [("before", compiled.sql), ("after", compiled.sql)]
    assert seen[0][2] == compiled.parameters({"job_id": "nothing"})
    assert str(jobs.c.id.name) in compiled.sql
