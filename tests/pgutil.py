"""A throw-away PostgreSQL database per test, on the server at 127.0.0.1:5432 (CI has one too)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

PG_ADMIN = os.environ.get("QWEN_EDIT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def pg_base() -> str:
    return PG_ADMIN.rsplit("/", 1)[0]


def pg_available() -> bool:
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


@contextmanager
def fresh_database() -> Iterator[str]:
    """Create ``qe_<random>``, yield its URL (postgresql://…), drop it (and its sessions) after."""
    if not pg_available():
        pytest.skip(f"no PostgreSQL at {PG_ADMIN}")
    name = f"qe_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{pg_base()}/{name}"
    finally:
        try:
            with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=10) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        except psycopg.Error:
            pass
