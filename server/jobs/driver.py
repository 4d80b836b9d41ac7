"""The hottest statements, compiled once per dialect and run on the driver's own cursor.

A statement built once (statements.py) still costs SQLAlchemy's execution of it on every call: a
pool-level context, the parameters walked and processed, a cursor result and its rows built. That
is little in a warm loop and a lot on the path of a job, where every process is cold: right after
a pipeline call (on the 2-core machine, after 0.3 s of sleep) a submit's statement on PostgreSQL
took 1.55 ms of client CPU through ``Connection.execute`` and 1.09 ms here, the wall time 3.2 ms
against 2.5 ms. Only the statements on the path of every job run here (``Database.run``): the
submit, a worker's claim, a job's end, a result read. The rest stay with SQLAlchemy.

What SQLAlchemy did that still happens here:

* the same SQL text and parameters: compiled by SQLAlchemy for the connection's dialect (its
  bind processors applied: JSON, booleans), so that PostgreSQL's prepared statements and every
  plan are shared with SQLAlchemy's own execution of the statement;
* the driver's errors become SQLAlchemy's (``DBAPIError.instance``, as its execution raises
  them), so that ``translated()`` maps them to ``StoreUnavailable`` and callers that read a
  SQLSTATE still can; a disconnect invalidates the pooled connection;
* ``before_cursor_execute`` / ``after_cursor_execute`` listeners of the engine (tracing, the
  tests that read statements and plans) are called, with no execution context;
* the result columns' processors (SQLite's JSON and booleans), rows with ``_mapping``.

Statements with expanding parameters (``IN`` lists) cannot run here (their SQL changes with the
list's length): ``DriverStatement.of`` says so, and ``Database.run`` leaves them to SQLAlchemy.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Connection
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler


def _row_type(names: list[str]) -> type:
    """Rows by position, by attribute, and by name through ``_mapping``, as SQLAlchemy's are."""
    base = namedtuple("Row", names, rename=True)  # type: ignore[misc]
    return type("Row", (base,), {"__slots__": (), "_mapping": property(lambda row: row._asdict())})


class DriverResult:
    """What a statement run on the driver returned: its rows (all fetched) and its row count."""

    __slots__ = ("rowcount", "rows")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    def first(self) -> Any:
        return self.rows[0] if self.rows else None

    def all(self) -> list[Any]:
        return self.rows

    def scalar_one(self) -> Any:
        if len(self.rows) != 1:
            raise sa_exc.NoResultFound("no row") if not self.rows else sa_exc.MultipleResultsFound("many rows")
        return self.rows[0][0]


class DriverStatement:
    """``statement`` compiled for ``dialect``, run on a connection's driver cursor (``run``)."""

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        if compiled.has_out_parameters or any(bind.expanding for bind in compiled.binds.values()):
            raise ValueError("a statement with expanding or out parameters cannot run on the driver")
        if getattr(compiled, "escaped_bind_names", None):
            raise ValueError(f"bind names that need escaping: {compiled.escaped_bind_names}")
        self.sql = str(compiled)
        self._compiled = compiled
        self._dialect = dialect
        self._order: tuple[str, ...] | None = tuple(compiled.positiontup or ()) if dialect.positional else None
        self._binds: dict[str, Callable[[Any], Any]] = {}
        for name, bind in compiled.binds.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                self._binds[name] = process
        columns = list(getattr(statement, "exported_columns", ()))
        self._row_type = _row_type([column.key for column in columns])
        self._results: list[Callable[[Any], Any] | None] = [
            column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns
        ]
        self._processes_results = any(process is not None for process in self._results)

    @classmethod
    def of(cls, statement: ClauseElement, dialect: Dialect) -> DriverStatement | None:
        """``statement`` compiled for the driver; None where it cannot run there (an ``IN`` list)."""
        try:
            return cls(statement, dialect)
        except ValueError:
            return None

    def parameters(self, values: Mapping[str, Any]) -> Any:
        """The driver's parameters for ``values``: every bind filled (literals, defaults), processed."""
        params = self._compiled.construct_params(dict(values), escape_names=False)
        for name, process in self._binds.items():
            value = params.get(name)
            if value is not None:
                params[name] = process(value)
        if self._order is not None:
            return tuple(params[name] for name in self._order)
        return params

    def run(self, conn: Connection, values: Mapping[str, Any]) -> DriverResult:
        """Run on ``conn`` (in its transaction, if it has one begun); the rows fetched at once."""
        params = self.parameters(values)
        sql = self.sql
        dbapi_conn = conn.connection.dbapi_connection
        assert dbapi_conn is not None
        dispatch = conn.dispatch
        cursor = dbapi_conn.cursor()
        try:
            for listener in dispatch.before_cursor_execute:
                sql, params = listener(conn, cursor, sql, params, None, False)
            try:
                cursor.execute(sql, params)
                raw: Any = cursor.fetchall() if cursor.description is not None else []
            except self._dialect.loaded_dbapi.Error as exc:
                raise self._translated(conn, exc, cursor, sql, params) from exc
            for listener in dispatch.after_cursor_execute:
                listener(conn, cursor, sql, params, None, False)
            return DriverResult(self._rows(raw), cursor.rowcount)
        finally:
            cursor.close()

    def _rows(self, raw: list[Any]) -> list[Any]:
        make = self._row_type._make  # type: ignore[attr-defined]
        if not self._processes_results:
            return [make(row) for row in raw]
        processes = self._results
        return [
            make(v if process is None or v is None else process(v) for process, v in zip(processes, row, strict=True))
            for row in raw
        ]

    def _translated(self, conn: Connection, exc: Any, cursor: Any, sql: str, params: Any) -> sa_exc.StatementError:
        """The driver's error as SQLAlchemy's execution raises it; a lost connection is invalidated."""
        dialect = self._dialect
        lost = dialect.is_disconnect(exc, conn.connection.dbapi_connection, cursor)
        if lost:
            conn.invalidate(exc)
        return sa_exc.DBAPIError.instance(
            sql, params, exc, dialect.loaded_dbapi.Error, connection_invalidated=lost, dialect=dialect
        )
