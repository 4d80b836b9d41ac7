"""Uploads the server holds: one row each, written when the bytes are accepted.

A signed PUT URL carries its own authorisation, so anyone holding it could send bytes again until
it expires; the row's primary key makes the first PUT the only one (``claim``), whatever the race.
"""

from __future__ import annotations

from sqlalchemy import delete, insert, select
from sqlalchemy import exc as sa_exc

from server.jobs.db import Database
from server.jobs.models import uploads


class Uploads:
    def __init__(self, db: Database) -> None:
        self.db = db

    def claim(self, key: str, size: int, key_id: str | None, now: int) -> bool:
        """Take ``key`` for one upload; False when it was taken before (the URL was used)."""
        try:
            with self.db.write() as conn:
                conn.execute(insert(uploads).values(key=key, size=size, api_key_id=key_id, created_at=now))
        except sa_exc.IntegrityError:
            return False
        return True

    def taken(self, key: str) -> bool:
        with self.db.read() as conn:
            return conn.execute(select(uploads.c.key).where(uploads.c.key == key)).first() is not None

    def release(self, key: str) -> None:
        """Give a claim back (the bytes were refused or could not be stored): the URL may be retried."""
        with self.db.write() as conn:
            conn.execute(delete(uploads).where(uploads.c.key == key))
