"""Where submissions live: SQLite (embedded default); PostgreSQL implements the same interface."""

from .base import Store
from .sqlite import SQLiteStore

__all__ = ["Store", "SQLiteStore", "open_store"]


def open_store(url_or_path: str) -> Store:
    """A store for a path (SQLite) or a postgresql:// URL."""
    if url_or_path.startswith(("postgresql://", "postgres://")):
        raise NotImplementedError("the PostgreSQL store is not built yet")
    return SQLiteStore(url_or_path)
