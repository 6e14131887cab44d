"""The schema's history, shared by every backend: entry i migrates a database from version i to i + 1.

Each backend keeps the version it is at (SQLite: ``PRAGMA user_version``; PostgreSQL: the
``runflare_schema`` table) and applies the missing steps in one transaction when it opens. Append new
steps; never edit a released one.
"""

from __future__ import annotations

from dataclasses import dataclass


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer server; this one refuses to touch it."""


@dataclass(frozen=True)
class Migration:
    """One schema step, written once per SQL dialect."""

    name: str
    sqlite: tuple[str, ...]
    postgresql: tuple[str, ...]


MIGRATIONS: list[Migration] = [
    Migration(
        "submissions",
        # doc is the JSON text of the Submission (json.dumps, ASCII with \u escapes), so lone surrogates in
        # outputs round-trip byte for byte; jsonb would reject them. rowid (SQLite) and seq (PostgreSQL)
        # break created_at ties in insertion order.
        sqlite=(
            """CREATE TABLE submissions (
                token TEXT PRIMARY KEY,
                created_at REAL NOT NULL,
                status_id INTEGER NOT NULL,
                doc TEXT NOT NULL
            )""",
            "CREATE INDEX submissions_created ON submissions (created_at)",
            "CREATE INDEX submissions_status ON submissions (status_id)",
        ),
        postgresql=(
            """CREATE TABLE submissions (
                token text PRIMARY KEY,
                created_at double precision NOT NULL,
                status_id integer NOT NULL,
                doc text NOT NULL,
                seq bigint GENERATED ALWAYS AS IDENTITY
            )""",
            "CREATE INDEX submissions_created ON submissions (created_at, seq)",
            "CREATE INDEX submissions_status ON submissions (status_id)",
        ),
    ),
]
SCHEMA_VERSION = len(MIGRATIONS)


def check_version(version: int, where: str) -> None:
    """Refuse a database whose schema is newer than this server's."""
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(f"{where} has schema {version}, newer than this server's {SCHEMA_VERSION}")
