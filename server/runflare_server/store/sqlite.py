"""The embedded store: one SQLite file in WAL mode, a JSON document per submission.

All sqlite3 work happens on one thread that owns the connection; the event loop only queues jobs and
awaits their futures. Writes queued while a commit is in flight are committed together in the next
transaction (group commit: one fsync for the lot), and each caller resumes only once its write is durable.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import StoreUnavailable, Submission
from .migrations import MIGRATIONS, SCHEMA_VERSION, check_version

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

_CHUNK = 500  # tokens per IN (...) query, well under SQLite's variable limit


@dataclass
class _Job:
    """A piece of sqlite3 work for the store's thread, and where to deliver its result."""

    fn: Callable[[sqlite3.Connection], Any]
    write: bool
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        """Resolve the caller's future from the store's thread (the caller may have gone away)."""
        try:
            self.loop.call_soon_threadsafe(_settle, self.future, result, error)
        except RuntimeError:  # the caller's loop is closed
            pass


def _nothing(_: sqlite3.Connection) -> None:
    pass


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled by the caller
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class SQLiteStore:
    """Submissions in SQLite, served by one dedicated thread with group commit."""

    kind = "sqlite"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.schema_version = 0  # known once open
        self._jobs: queue.SimpleQueue[_Job | None] | None = None
        self._thread: threading.Thread | None = None

    async def open(self) -> None:
        """Start the store's thread, connect, and migrate the schema to the current version."""
        if self._jobs is not None:
            return
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[int] = loop.create_future()
        jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        thread = threading.Thread(target=self._serve, args=(jobs, _Job(_nothing, True, ready, loop)),
                                  name=f"sqlite-store {self.path.name}", daemon=True)
        thread.start()
        try:
            self.schema_version = await ready
        except BaseException:
            jobs.put(None)
            await asyncio.to_thread(thread.join)
            raise
        self._jobs, self._thread = jobs, thread

    async def close(self) -> None:
        """Finish the queued jobs, then stop the thread and close the connection."""
        jobs, thread = self._jobs, self._thread
        self._jobs = self._thread = None
        if jobs is not None and thread is not None:
            jobs.put(None)
            await asyncio.to_thread(thread.join)

    async def ping(self) -> bool:
        try:
            return await self._call(lambda db: db.execute("SELECT 1").fetchone() == (1,))
        except Exception:
            return False

    async def create(self, subs: list[Submission]) -> None:
        rows = [(s["token"], s["created_at"], s["status_id"], json.dumps(s)) for s in subs]

        def write(db: sqlite3.Connection) -> None:
            # Nothing of sqlite3 may leave the store's thread: a cursor freed on the loop's thread while
            # this one uses the connection is "bad parameter or other API misuse".
            db.executemany("INSERT INTO submissions VALUES (?, ?, ?, ?)", rows).close()

        await self._call(write, write=True)

    async def get(self, token: str) -> Submission | None:
        return (await self.get_many([token]))[0]

    async def get_many(self, tokens: list[str]) -> list[Submission | None]:
        def read(db: sqlite3.Connection) -> dict[str, str]:
            docs: dict[str, str] = {}
            for i in range(0, len(tokens), _CHUNK):
                chunk = tokens[i:i + _CHUNK]
                marks = ",".join("?" * len(chunk))
                docs.update(db.execute(f"SELECT token, doc FROM submissions WHERE token IN ({marks})", chunk))
            return docs

        docs = await self._call(read) if tokens else {}
        return [json.loads(docs[t]) if t in docs else None for t in tokens]

    async def update(self, token: str, changes: dict[str, Any]) -> Submission | None:
        def write(db: sqlite3.Connection) -> Submission | None:
            row = db.execute("SELECT doc FROM submissions WHERE token = ?", (token,)).fetchone()
            if row is None:
                return None
            doc = {**json.loads(row[0]), **changes}
            db.execute("UPDATE submissions SET doc = ?, status_id = ? WHERE token = ?",
                       (json.dumps(doc), doc["status_id"], token))
            return doc  # type: ignore[return-value]

        return await self._call(write, write=True)

    async def page(self, offset: int, limit: int) -> tuple[list[Submission], int]:
        def read(db: sqlite3.Connection) -> tuple[list[str], int]:
            db.execute("BEGIN")  # one snapshot for the count and the rows
            try:
                total = db.execute("SELECT count(*) FROM submissions").fetchone()[0]
                rows = db.execute("SELECT doc FROM submissions ORDER BY created_at DESC, rowid DESC "
                                  "LIMIT ? OFFSET ?", (limit, offset)).fetchall()
            finally:
                db.execute("COMMIT")
            return [r[0] for r in rows], total

        docs, total = await self._call(read)
        return [json.loads(d) for d in docs], total

    async def delete(self, token: str) -> Submission | None:
        def write(db: sqlite3.Connection) -> str | None:
            row = db.execute("SELECT doc FROM submissions WHERE token = ?", (token,)).fetchone()
            if row is not None:
                db.execute("DELETE FROM submissions WHERE token = ?", (token,))
            return row[0] if row else None

        doc = await self._call(write, write=True)
        return json.loads(doc) if doc is not None else None

    async def unfinished(self) -> list[str]:
        def read(db: sqlite3.Connection) -> list[str]:
            rows = db.execute("SELECT token FROM submissions WHERE status_id IN (1, 2) "
                              "ORDER BY created_at, rowid").fetchall()
            return [r[0] for r in rows]

        return await self._call(read)

    async def _call(self, fn: Callable[[sqlite3.Connection], Any], write: bool = False) -> Any:
        """Run `fn(connection)` on the store's thread; a write returns once committed."""
        jobs = self._jobs
        if jobs is None:
            raise RuntimeError("store is not open")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        jobs.put(_Job(fn, write, future, loop))
        try:
            return await future
        except sqlite3.OperationalError as e:  # disk full, I/O error, locked by another process too long
            raise StoreUnavailable(f"SQLite {self.path}: {e}") from e

    # Everything below runs on the store's thread.

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            check_version(db.execute("PRAGMA user_version").fetchone()[0], str(self.path))
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a 201'd submission survives a killed process and a power cut
            db.execute("PRAGMA busy_timeout=5000")
            db.execute("BEGIN IMMEDIATE")  # another process may be migrating the same file
            try:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                check_version(version, str(self.path))
                for step in MIGRATIONS[version:]:
                    for statement in step.sqlite:
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except BaseException:
            db.close()
            raise
        return db

    def _serve(self, jobs: queue.SimpleQueue[_Job | None], opening: _Job) -> None:
        try:
            db = self._connect()
        except Exception as e:
            opening.settle(error=e)
            return
        opening.settle(SCHEMA_VERSION)
        try:
            while True:
                batch = [jobs.get()]
                while True:  # everything queued meanwhile joins this round
                    try:
                        batch.append(jobs.get_nowait())
                    except queue.Empty:
                        break
                work = [job for job in batch if job is not None]
                self._commit(db, [job for job in work if job.write])
                for job in work:
                    if not job.write:
                        self._run(db, job)
                if None in batch:
                    return
        finally:
            db.close()

    @staticmethod
    def _run(db: sqlite3.Connection, job: _Job) -> None:
        try:
            result = job.fn(db)
        except Exception as e:
            job.settle(error=e)
        else:
            job.settle(result)

    @staticmethod
    def _commit(db: sqlite3.Connection, writes: list[_Job]) -> None:
        """All `writes` in one transaction, each in a savepoint (one failing write fails only its caller)."""
        if not writes:
            return
        outcomes: list[tuple[_Job, Any, Exception | None]] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            for job in writes:
                db.execute("SAVEPOINT job")
                try:
                    outcomes.append((job, job.fn(db), None))
                except (sqlite3.IntegrityError, sqlite3.ProgrammingError, KeyError, TypeError, ValueError) as e:
                    db.execute("ROLLBACK TO job")
                    outcomes.append((job, None, e))
                db.execute("RELEASE job")
            db.execute("COMMIT")
        except Exception as e:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            for job in writes:
                job.settle(error=e)
            return
        for job, result, error in outcomes:
            job.settle(result, error)
