"""The embedded store: one SQLite file in WAL mode, a JSON document per submission."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from .base import Submission

# Each entry migrates the schema from version i to i + 1 (PRAGMA user_version).
MIGRATIONS = [
    """
    CREATE TABLE submissions (
        token TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        status_id INTEGER NOT NULL,
        doc TEXT NOT NULL
    );
    CREATE INDEX submissions_created ON submissions (created_at);
    CREATE INDEX submissions_status ON submissions (status_id);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


class SQLiteStore:
    """Submissions in SQLite. Calls are short and run on the event loop's thread."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.db: sqlite3.Connection | None = None

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a 201'd submission survives a killed process and a power cut
        db.execute("PRAGMA busy_timeout=5000")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path} has schema {version}, newer than this server's {SCHEMA_VERSION}")
        for step in range(version, SCHEMA_VERSION):
            db.executescript(f"BEGIN; {MIGRATIONS[step]} PRAGMA user_version = {step + 1}; COMMIT;")
        self.db = db

    async def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    async def ping(self) -> bool:
        try:
            return self._db.execute("SELECT 1").fetchone() == (1,)
        except (sqlite3.Error, RuntimeError):
            return False

    @property
    def schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    @property
    def _db(self) -> sqlite3.Connection:
        if self.db is None:
            raise RuntimeError("store is not open")
        return self.db

    async def create(self, subs: list[Submission]) -> None:
        rows = [(s["token"], s["created_at"], s["status_id"], json.dumps(s)) for s in subs]
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO submissions VALUES (?, ?, ?, ?)", rows)

    async def get(self, token: str) -> Submission | None:
        row = self._db.execute("SELECT doc FROM submissions WHERE token = ?", (token,)).fetchone()
        return json.loads(row[0]) if row else None

    async def get_many(self, tokens: list[str]) -> list[Submission | None]:
        return [await self.get(token) for token in tokens]

    async def update(self, token: str, changes: dict[str, Any]) -> None:
        db = self._db
        with db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT doc FROM submissions WHERE token = ?", (token,)).fetchone()
            if row is None:
                return
            doc = {**json.loads(row[0]), **changes}
            db.execute("UPDATE submissions SET doc = ?, status_id = ? WHERE token = ?",
                       (json.dumps(doc), doc["status_id"], token))

    async def page(self, offset: int, limit: int) -> tuple[list[Submission], int]:
        total = self._db.execute("SELECT count(*) FROM submissions").fetchone()[0]
        rows = self._db.execute(
            "SELECT doc FROM submissions ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?", (limit, offset)
        ).fetchall()
        return [json.loads(r[0]) for r in rows], total

    async def delete(self, token: str) -> Submission | None:
        sub = await self.get(token)
        if sub is not None:
            with self._db:
                self._db.execute("DELETE FROM submissions WHERE token = ?", (token,))
        return sub

    async def unfinished(self) -> list[str]:
        rows = self._db.execute(
            "SELECT token FROM submissions WHERE status_id IN (1, 2) ORDER BY created_at, rowid"
        ).fetchall()
        return [r[0] for r in rows]
