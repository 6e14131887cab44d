"""Where submissions live: SQLite (embedded default) or PostgreSQL (scale-out), behind one interface."""

from __future__ import annotations

from .base import Store, StoreUnavailable
from .sqlite import SQLiteStore

__all__ = ["SQLiteStore", "Store", "StoreUnavailable", "open_store"]


def open_store(url_or_path: str) -> Store:
    """A store, not yet opened, for a path or `sqlite:///ABS/PATH` (SQLite) or a `postgresql://` or
    `postgres://` URL (PostgreSQL; needs the `scale` extra)."""
    if url_or_path.startswith(("postgresql://", "postgres://")):
        try:
            from .postgres import PostgresStore
        except ImportError as e:
            raise ImportError(f"a PostgreSQL store needs psycopg: pip install 'runflare[scale]' ({e})") from e
        return PostgresStore(url_or_path)
    if url_or_path.startswith("sqlite://"):
        return SQLiteStore(url_or_path.removeprefix("sqlite://"))
    return SQLiteStore(url_or_path)
