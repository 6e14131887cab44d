"""The scale-out store: PostgreSQL through psycopg 3's async pool, the same schema and migrations as SQLite.

Every API and worker node opens the same database; the first to start migrates it (under an advisory
lock, so nodes starting together migrate once). Documents are stored as JSON text, not jsonb: jsonb
rejects the lone surrogates that undecodable program output becomes, text keeps them exactly.

An unreachable server never hangs a caller: connecting, waiting for a pooled connection and each whole
operation are bounded, and every failure to reach the server is raised as StoreUnavailable. The pool
reconnects on its own, so the store works again once the server is back.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool

from ..statuses import is_final
from .base import StoreUnavailable, Submission
from .migrations import MIGRATIONS, SCHEMA_VERSION, check_version

__all__ = ["PostgresStore"]

T = TypeVar("T")

# Both nodes of a cluster take the same lock (per database and schema) before migrating.
_MIGRATION_LOCK = ("SELECT pg_advisory_xact_lock(hashtext('runflare_schema'), "
                   "hashtext(coalesce(current_schema(), '')))")


CHECK_AFTER_IDLE = 1.0  # seconds a pooled connection may sit unused before it is checked on its next use


async def _check_if_idle(conn: psycopg.AsyncConnection) -> None:
    if time.monotonic() - getattr(conn, "_runflare_used", 0.0) > CHECK_AFTER_IDLE:
        await AsyncConnectionPool.check_connection(conn)


KNOWN_ROWS = 256  # rows kept with their version by KnownRows, and their total size at most:
KNOWN_BYTES = 4 << 20


class KnownRows:
    """The rows this process read or wrote last, with their version (xmin), so that an update of one (the
    worker: Processing, then the result) is one statement instead of a locked read and a write. Bounded in
    count and bytes; finished runs and large documents are not kept."""

    def __init__(self, count: int = KNOWN_ROWS, size: int = KNOWN_BYTES) -> None:
        self.count, self.size = count, size
        self._rows: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._bytes = 0

    def remember(self, token: str, version: str, text: str, final: bool) -> None:
        self.take(token)
        if final or len(text) > self.size // 16:
            return
        self._rows[token] = (version, text)
        self._bytes += len(text)
        while len(self._rows) > self.count or self._bytes > self.size:
            self._bytes -= len(self._rows.popitem(last=False)[1][1])

    def take(self, token: str) -> tuple[str, str] | None:
        """The row's (version, document JSON), forgotten here: a failed write must not leave it behind."""
        row = self._rows.pop(token, None)
        if row is not None:
            self._bytes -= len(row[1])
        return row


class PostgresStore:
    """Submissions in PostgreSQL (a `postgresql://` URL, libpq syntax, `options=-csearch_path%3D...` works)."""

    kind = "postgresql"

    def __init__(self, url: str, *, connect_timeout: int = 3, pool_timeout: float = 5.0,
                 op_timeout: float = 10.0, min_size: int = 1, max_size: int = 10):
        self.url = url
        self.connect_timeout = max(2, connect_timeout)  # libpq's minimum
        self.pool_timeout = pool_timeout  # waiting for a pooled connection (covers reconnecting)
        self.op_timeout = op_timeout  # a whole operation, should a connection stop answering mid-query
        self.min_size, self.max_size = min_size, max_size
        self.schema_version = 0  # known once open
        self._pool: AsyncConnectionPool | None = None
        self._known = KnownRows()

    async def open(self) -> None:
        """Connect and migrate; StoreUnavailable if the server cannot be reached within the timeouts."""
        if self._pool is not None:
            return
        # Migrate on a connection of its own first: an unreachable server fails here at once.
        try:
            conn = await asyncio.wait_for(psycopg.AsyncConnection.connect(self.url, **self._connect_kwargs),
                                          self.op_timeout)
        except (psycopg.OperationalError, asyncio.TimeoutError) as e:
            raise StoreUnavailable(f"PostgreSQL unreachable: {e}") from e
        try:
            self.schema_version = await self._migrate(conn)
        except psycopg.OperationalError as e:
            raise StoreUnavailable(f"PostgreSQL unavailable: {e}") from e
        finally:
            await conn.close()
        pool = AsyncConnectionPool(
            self.url, open=False, min_size=self.min_size, max_size=self.max_size, timeout=self.pool_timeout,
            # A pooled connection idle for a while is checked before use, so stale ones (the server
            # restarted) are replaced; one in steady use is not (a check is a round trip per query).
            check=_check_if_idle,
            # Give up a reconnection round soon, so the next request starts a fresh attempt instead of
            # waiting out a long backoff once the server is back.
            reconnect_timeout=self.pool_timeout,
            kwargs=self._connect_kwargs, name="runflare-store",
        )
        try:
            await pool.open(wait=True, timeout=self.pool_timeout)
        except psycopg.OperationalError as e:
            await pool.close()
            raise StoreUnavailable(f"PostgreSQL unreachable: {e}") from e
        self._pool = pool

    @property
    def _connect_kwargs(self) -> dict[str, Any]:
        return {"autocommit": True, "connect_timeout": self.connect_timeout, "application_name": "runflare",
                "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 3, "keepalives_count": 3}

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def ping(self) -> bool:
        async def select_one(conn: psycopg.AsyncConnection) -> bool:
            return await (await conn.execute("SELECT 1")).fetchone() == (1,)

        try:  # a health check answers within connect_timeout, even while the pool is reconnecting
            return await asyncio.wait_for(self._run(select_one), self.connect_timeout)
        except Exception:
            return False

    async def create(self, subs: list[Submission]) -> None:
        rows = [(s["token"], s["created_at"], s["status_id"], json.dumps(s)) for s in subs]

        sql = "INSERT INTO submissions (token, created_at, status_id, doc) VALUES (%s, %s, %s, %s)"

        async def insert(conn: psycopg.AsyncConnection) -> None:
            if len(rows) == 1:  # one statement is its own transaction: one round trip, not three
                await conn.execute(sql, rows[0])
                return
            async with conn.transaction(), conn.cursor() as cur:
                await cur.executemany(sql, rows)

        if rows:
            await self._run(insert)

    async def get(self, token: str) -> Submission | None:
        async def select(conn: psycopg.AsyncConnection) -> tuple[str, str] | None:
            cur = await conn.execute("SELECT doc, xmin::text FROM submissions WHERE token = %s", (token,))
            return await cur.fetchone()

        row = await self._run(select)
        if row is None:
            return None
        doc = json.loads(row[0])
        self._known.remember(token, row[1], row[0], is_final(doc["status_id"]))
        return doc

    async def get_many(self, tokens: list[str]) -> list[Submission | None]:
        async def select(conn: psycopg.AsyncConnection) -> dict[str, str]:
            cur = await conn.execute("SELECT token, doc FROM submissions WHERE token = ANY(%s)", (tokens,))
            return dict(await cur.fetchall())

        docs = await self._run(select) if tokens else {}
        return [json.loads(docs[t]) if t in docs else None for t in tokens]

    async def update(self, token: str, changes: dict[str, Any]) -> Submission | None:
        """Merge `changes` into the document. A row this process read or wrote last is written in one
        statement if nobody changed it since (its xmin is the same); otherwise it is read and merged under
        a row lock."""
        known = self._known.take(token)
        if known is not None:
            version, text = known
            doc = {**json.loads(text), **changes}
            new_text = json.dumps(doc)

            async def swap(conn: psycopg.AsyncConnection) -> tuple[str] | None:
                cur = await conn.execute("UPDATE submissions SET doc = %s, status_id = %s "
                                         "WHERE token = %s AND xmin = %s::xid RETURNING xmin::text",
                                         (new_text, doc["status_id"], token, version))
                return await cur.fetchone()

            row = await self._run(swap)
            if row is not None:
                self._known.remember(token, row[0], new_text, is_final(doc["status_id"]))
                return doc  # type: ignore[return-value]

        async def merge(conn: psycopg.AsyncConnection) -> tuple[Submission, str, str] | None:
            async with conn.transaction():
                cur = await conn.execute("SELECT doc FROM submissions WHERE token = %s FOR UPDATE", (token,))
                row = await cur.fetchone()
                if row is None:
                    return None
                doc = {**json.loads(row[0]), **changes}
                text = json.dumps(doc)
                cur = await conn.execute("UPDATE submissions SET doc = %s, status_id = %s WHERE token = %s "
                                         "RETURNING xmin::text", (text, doc["status_id"], token))
                version = (await cur.fetchone())[0]
            return doc, version, text  # type: ignore[return-value]

        merged = await self._run(merge)
        if merged is None:
            return None
        doc, version, text = merged
        self._known.remember(token, version, text, is_final(doc["status_id"]))
        return doc

    async def page(self, offset: int, limit: int) -> tuple[list[Submission], int]:
        async def select(conn: psycopg.AsyncConnection) -> tuple[list[str], int]:
            async with conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                total = (await (await conn.execute("SELECT count(*) FROM submissions")).fetchone())[0]
                cur = await conn.execute("SELECT doc FROM submissions ORDER BY created_at DESC, seq DESC "
                                         "LIMIT %s OFFSET %s", (limit, offset))
                return [r[0] for r in await cur.fetchall()], total

        docs, total = await self._run(select)
        return [json.loads(d) for d in docs], total

    async def delete(self, token: str) -> Submission | None:
        async def remove(conn: psycopg.AsyncConnection) -> str | None:
            cur = await conn.execute("DELETE FROM submissions WHERE token = %s RETURNING doc", (token,))
            row = await cur.fetchone()
            return row[0] if row else None

        self._known.take(token)
        doc = await self._run(remove)
        return json.loads(doc) if doc is not None else None

    async def unfinished(self) -> list[str]:
        async def select(conn: psycopg.AsyncConnection) -> list[str]:
            cur = await conn.execute("SELECT token FROM submissions WHERE status_id IN (1, 2) "
                                     "ORDER BY created_at, seq")
            return [r[0] for r in await cur.fetchall()]

        return await self._run(select)

    async def _run(self, fn: Callable[[psycopg.AsyncConnection], Awaitable[T]]) -> T:
        """`fn` on a pooled connection, bounded by op_timeout; unreachable server -> StoreUnavailable."""
        pool = self._pool
        if pool is None:
            raise RuntimeError("store is not open")

        async def attempt() -> T:
            async with pool.connection() as conn:
                result = await fn(conn)
                conn._runflare_used = time.monotonic()  # type: ignore[attr-defined]
                return result

        try:
            return await asyncio.wait_for(attempt(), self.op_timeout)
        except asyncio.TimeoutError as e:
            raise StoreUnavailable(f"PostgreSQL did not answer within {self.op_timeout} s") from e
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            raise StoreUnavailable(f"PostgreSQL unavailable: {e}") from e

    @staticmethod
    async def _migrate(conn: psycopg.AsyncConnection) -> int:
        async with conn.transaction():
            await conn.execute(_MIGRATION_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS runflare_schema ("
                               "one boolean PRIMARY KEY DEFAULT true CHECK (one), version integer NOT NULL)")
            row = await (await conn.execute("SELECT version FROM runflare_schema")).fetchone()
            if row is None:
                await conn.execute("INSERT INTO runflare_schema (version) VALUES (0)")
            version = row[0] if row else 0
            check_version(version, f"PostgreSQL database {conn.info.dbname!r}")
            for step in MIGRATIONS[version:]:
                for statement in step.postgresql:
                    await conn.execute(statement)  # type: ignore[arg-type]
            if version < SCHEMA_VERSION:
                await conn.execute("UPDATE runflare_schema SET version = %s", (SCHEMA_VERSION,))
        return SCHEMA_VERSION
