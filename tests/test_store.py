"""The store contract, run against every backend: SQLite on a temp file and PostgreSQL at 127.0.0.1:5432
in a schema of its own per test. Then what only one backend has: SQLite's WAL file, PostgreSQL's
concurrent migrations and outages (a loopback relay in front of the real server is cut and restored)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, skip_or_fail

from runflare_server.store import SQLiteStore, Store, StoreUnavailable, open_store
from runflare_server.store.migrations import SCHEMA_VERSION, SchemaTooNew

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
HANG_BOUND = 20  # seconds; only fails a run that hangs, never a measurement


def sub(token: str, status: int = 1, created: float | None = None, **fields: Any) -> dict:
    return {"token": token, "status_id": status, "created_at": created or time.time(), "stdout": None, **fields}


@dataclass
class Backend:
    """A fresh, empty database for one test, and raw access to its schema version behind the store's back."""

    name: str
    url: str
    read_version: Callable[[], int]
    write_version: Callable[[int], None]

    def store(self) -> Store:
        return open_store(self.url)


def sqlite_backend(path: Path) -> Backend:
    def read_version() -> int:
        with sqlite3.connect(path) as db:
            return db.execute("PRAGMA user_version").fetchone()[0]

    def write_version(version: int) -> None:
        db = sqlite3.connect(path)
        db.execute(f"PRAGMA user_version = {version}")
        db.close()

    return Backend("sqlite", f"sqlite://{path}", read_version, write_version)


@pytest.fixture
def pg_schema() -> Iterator[tuple[Any, str]]:
    """An admin connection and a new empty schema, dropped afterwards."""
    try:
        import psycopg
    except ImportError as e:
        skip_or_fail(f"psycopg is not installed: {e}")
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as e:
        skip_or_fail(f"no PostgreSQL at {PG_URL}: {e}")
    schema = f"rf_test_{uuid.uuid4().hex[:16]}"
    admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield admin, schema
    finally:
        admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        admin.close()


def pg_url(schema: str, port: int = 5432) -> str:
    return f"postgresql://postgres@127.0.0.1:{port}/test?options=-csearch_path%3D{schema}"


def postgres_backend(admin: Any, schema: str) -> Backend:
    def read_version() -> int:
        return admin.execute(f'SELECT version FROM "{schema}".runflare_schema').fetchone()[0]

    def write_version(version: int) -> None:
        admin.execute(f'UPDATE "{schema}".runflare_schema SET version = %s', (version,))

    return Backend("postgresql", pg_url(schema), read_version, write_version)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return sqlite_backend(tmp_path / "db.sqlite3")
    return postgres_backend(*request.getfixturevalue("pg_schema"))


@asynccontextmanager
async def opened(backend_or_store: Backend | Store) -> AsyncIterator[Store]:
    store = backend_or_store.store() if isinstance(backend_or_store, Backend) else backend_or_store
    await store.open()
    try:
        yield store
    finally:
        await store.close()


# The contract, on every backend.


async def test_create_then_get_and_get_many_in_the_order_asked(backend):
    async with opened(backend) as store:
        a, b = sub("a", stdin="1 2"), sub("b", 3, outputs=[{"name": "x", "value": 1}])
        await store.create([a, b])
        assert await store.get("a") == a
        assert await store.get("missing") is None
        assert await store.get_many(["b", "missing", "a"]) == [b, None, a]
        assert await store.get_many([]) == []


async def test_created_rows_are_durable_and_visible_to_another_store(backend):
    async with opened(backend) as store:
        await store.create([sub("a"), sub("b")])
        async with opened(backend) as other:
            assert [s["token"] for s in await other.get_many(["a", "b"])] == ["a", "b"]


async def test_update_merges_and_returns_the_document(backend):
    async with opened(backend) as store:
        await store.create([sub("a", stdin="in")])
        after = await store.update("a", {"status_id": 3, "stdout": "out", "time": 0.5})
        assert after == {**sub("a", stdin="in", created=after["created_at"]), "status_id": 3, "stdout": "out",
                         "time": 0.5}
        assert await store.get("a") == after
        assert await store.update("missing", {"status_id": 3}) is None
        assert await store.get("missing") is None


async def test_lone_surrogates_nul_and_non_ascii_round_trip(backend):
    odd = {"stdout": "x\udcff", "stderr": "\udc80\x00\ud800y", "compile_output": "é 😀 \u2028"}
    async with opened(backend) as store:
        await store.create([sub("a", **odd)])
        await store.update("a", {"message": "\udcfe"})
        assert await store.get("a") == {**sub("a", created=(await store.get("a"))["created_at"]), **odd,
                                         "message": "\udcfe"}
    async with opened(backend) as store:
        assert (await store.get("a"))["stdout"] == "x\udcff"


async def test_page_is_newest_first_with_insertion_order_breaking_ties_and_counts_all(backend):
    now = time.time()
    async with opened(backend) as store:
        await store.create([sub("old", 1, now - 3), sub("mid", 3, now - 2)])
        for token in ("tie1", "tie2", "tie3"):  # same created_at: the last inserted comes first
            await store.create([sub(token, 3, now)])
        page, total = await store.page(0, 2)
        assert total == 5 and [s["token"] for s in page] == ["tie3", "tie2"]
        page, total = await store.page(2, 10)
        assert total == 5 and [s["token"] for s in page] == ["tie1", "mid", "old"]
        assert await store.page(10, 10) == ([], 5)


async def test_delete_returns_the_document_once(backend):
    async with opened(backend) as store:
        await store.create([sub("a"), sub("b")])
        deleted = await store.delete("a")
        assert deleted is not None and deleted["token"] == "a"
        assert await store.delete("a") is None
        assert await store.get("a") is None
        assert (await store.page(0, 10))[1] == 1


async def test_unfinished_is_queued_and_running_oldest_first(backend):
    now = time.time()
    async with opened(backend) as store:
        await store.create([sub("new", 1, now - 1), sub("done", 3, now - 4), sub("old", 1, now - 3),
                            sub("running", 2, now - 2)])
        assert await store.unfinished() == ["old", "running", "new"]
        await store.update("running", {"status_id": 4})
        await store.update("done", {"status_id": 2})
        assert await store.unfinished() == ["done", "old", "new"]


async def test_concurrent_updates_to_one_token_lose_nothing(backend):
    async with opened(backend) as store:
        await store.create([sub("a")])

        async def updater(i: int) -> None:
            for j in range(4):
                await store.update("a", {f"f{i}_{j}": j, "status_id": 2})

        await asyncio.gather(*(updater(i) for i in range(50)))
        doc = await store.get("a")
        assert {k: v for k, v in doc.items() if k.startswith("f")} == {
            f"f{i}_{j}": j for i in range(50) for j in range(4)}


async def test_concurrent_creates_are_all_stored_and_a_failing_one_fails_alone(backend):
    async with opened(backend) as store:
        await store.create([sub("dup")])
        results = await asyncio.gather(*(store.create([sub(f"t{i}")]) for i in range(20)),
                                       store.create([sub("dup")]), return_exceptions=True)
        assert results[:20] == [None] * 20
        assert isinstance(results[20], Exception) and not isinstance(results[20], StoreUnavailable)
        assert (await store.page(0, 100))[1] == 21


async def test_an_empty_database_is_migrated_once_and_reopens_unchanged(backend):
    async with opened(backend) as store:
        assert store.schema_version == SCHEMA_VERSION >= 1
        await store.create([sub("a")])
    assert backend.read_version() == SCHEMA_VERSION
    async with opened(backend) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert (await store.get("a"))["token"] == "a"
    assert backend.read_version() == SCHEMA_VERSION


async def test_a_database_with_a_newer_schema_is_refused(backend):
    async with opened(backend) as store:
        await store.create([sub("a")])
    backend.write_version(SCHEMA_VERSION + 1)
    store = backend.store()
    with pytest.raises(SchemaTooNew, match="newer"):
        await store.open()
    assert backend.read_version() == SCHEMA_VERSION + 1
    assert await store.ping() is False


async def test_ping_answers_while_open(backend):
    store = backend.store()
    assert await store.ping() is False
    async with opened(store):
        assert await store.ping() is True
    assert await store.ping() is False


def test_open_store_picks_the_backend_from_the_url(tmp_path):
    assert isinstance(open_store(str(tmp_path / "a.db")), SQLiteStore)
    store = open_store(f"sqlite://{tmp_path}/b.db")
    assert store.kind == "sqlite" and store.path == tmp_path / "b.db"
    assert open_store(PG_URL).kind == "postgresql"
    assert open_store("postgres://postgres@127.0.0.1/test").kind == "postgresql"


# SQLite only.


async def test_sqlite_file_is_in_wal_mode(tmp_path):
    async with opened(SQLiteStore(tmp_path / "db.sqlite3")):
        pass
    with sqlite3.connect(tmp_path / "db.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_sqlite_file_of_a_newer_server_is_left_untouched(tmp_path):
    path = tmp_path / "db.sqlite3"
    sqlite3.connect(path).execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaTooNew, match="newer"):
        await SQLiteStore(path).open()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] != "wal"
        assert db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0


# PostgreSQL only.


async def test_postgres_nodes_starting_together_migrate_once(pg_schema):
    admin, schema = pg_schema
    stores = [open_store(pg_url(schema)) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        assert [s.schema_version for s in stores] == [SCHEMA_VERSION] * 4
        await stores[0].create([sub("a")])
        assert (await stores[3].get("a"))["token"] == "a"
        assert admin.execute(f'SELECT version FROM "{schema}".runflare_schema').fetchall() == [(SCHEMA_VERSION,)]
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_postgres_stores_documents_as_text_not_jsonb(pg_schema):
    admin, schema = pg_schema
    async with opened(open_store(pg_url(schema))) as store:
        await store.create([sub("a", stdout="x\udcff")])
    doc = admin.execute(f'SELECT doc FROM "{schema}".submissions').fetchone()[0]
    assert "\\udcff" in doc


async def test_postgres_unreachable_raises_store_unavailable_and_ping_is_false():
    pytest.importorskip("psycopg")
    store = open_store("postgresql://postgres@127.0.0.1:1/test")
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(store.open(), HANG_BOUND)
    assert await asyncio.wait_for(store.ping(), HANG_BOUND) is False


class Relay:
    """A TCP relay on 127.0.0.1 in front of PostgreSQL, to cut (refuse and reset) and restore."""

    def __init__(self, target_port: int = 5432):
        self.port, self.target_port = free_port(), target_port
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        await self.server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.transport.abort()
                self.writers.discard(dst)

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def until(predicate: Callable[[], Awaitable[bool]], bound: float = HANG_BOUND * 3) -> None:
    deadline = time.monotonic() + bound
    while not await predicate():
        assert time.monotonic() < deadline, f"not true within {bound} s"
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_postgres_outage_raises_store_unavailable_and_the_store_recovers_by_itself(pg_schema):
    from runflare_server.store.postgres import PostgresStore

    _, schema = pg_schema
    relay = Relay()
    await relay.start()
    store = PostgresStore(pg_url(schema, relay.port), connect_timeout=2, pool_timeout=2)
    async with opened(store):
        await store.create([sub("a")])
        await relay.cut()
        calls = [store.create([sub("b")]), store.get("a"), store.get_many(["a"]), store.update("a", {"x": 1}),
                 store.page(0, 10), store.delete("a"), store.unfinished()]
        for call in calls:
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(call, HANG_BOUND)
        assert await asyncio.wait_for(store.ping(), HANG_BOUND) is False

        await relay.start()
        await until(store.ping)
        assert (await store.update("a", {"x": 2}))["x"] == 2
        await store.create([sub("b")])
        assert [s["token"] for s in (await store.page(0, 10))[0]] == ["b", "a"]
    await relay.cut()


async def test_an_update_keeps_what_another_node_wrote_since_this_one_read(backend):
    """Each node writes a row it knows in one statement only if nobody changed it since; a change made
    meanwhile by another node is merged with, never overwritten."""
    async with opened(backend) as worker, opened(backend) as api:
        await worker.create([sub("a", stdin="in")])
        assert (await worker.get("a"))["stdin"] == "in"  # the worker knows the row now
        await worker.update("a", {"status_id": 2})
        await api.update("a", {"stdout": "from the other node"})
        after = await worker.update("a", {"status_id": 3, "time": 0.5})
        assert (after["stdout"], after["status_id"], after["time"]) == ("from the other node", 3, 0.5)
        assert await api.get("a") == after
        await api.delete("a")
        assert await worker.update("a", {"status_id": 4}) is None
        assert await worker.get("a") is None
        await worker.create([sub("b")])
        for n in range(5):  # the row it wrote last, updated again and again
            assert (await worker.update("b", {"n": n}))["n"] == n
        assert (await api.get("b"))["n"] == 4


def test_the_rows_a_postgres_node_knows_are_bounded():
    from runflare_server.store.postgres import KnownRows

    known = KnownRows(count=3, size=160)
    for token in "abcd":
        known.remember(token, "1", "x" * 10, final=False)
    assert known.take("a") is None and known.take("b") == ("1", "x" * 10)  # the oldest went first
    known.remember("big", "1", "x" * 11, final=False)  # over a 16th of the budget: not kept
    known.remember("done", "1", "{}", final=True)  # a finished run is not written again
    known.remember("c", "2", "y", final=False)  # the newer version replaces the older one
    assert (known.take("big"), known.take("done"), known.take("c"), known.take("c")) == (None, None, ("2", "y"), None)
