"""The SQLite store on a real file: schema versioning, durability across connections, paging, recovery order."""

from __future__ import annotations

import sqlite3
import time

import pytest

from runflare_server.store.sqlite import SCHEMA_VERSION, SQLiteStore


def sub(token: str, status: int = 1, created: float | None = None) -> dict:
    return {"token": token, "status_id": status, "created_at": created or time.time(), "stdout": None}


async def test_new_file_gets_current_schema_in_wal_mode(tmp_path):
    store = SQLiteStore(tmp_path / "db.sqlite3")
    await store.open()
    assert store.schema_version == SCHEMA_VERSION >= 1
    await store.close()
    db = sqlite3.connect(tmp_path / "db.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "db.sqlite3"
    sqlite3.connect(path).execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(RuntimeError, match="newer"):
        await SQLiteStore(path).open()


async def test_created_rows_are_visible_to_another_connection(tmp_path):
    store = SQLiteStore(tmp_path / "db.sqlite3")
    await store.open()
    await store.create([sub("a"), sub("b")])
    other = sqlite3.connect(tmp_path / "db.sqlite3")
    assert {r[0] for r in other.execute("SELECT token FROM submissions")} == {"a", "b"}
    await store.update("a", {"status_id": 3, "stdout": "x\udcff"})  # undecodable output survives
    assert (await store.get("a"))["stdout"] == "x\udcff"
    assert await store.get("missing") is None
    await store.close()


async def test_page_newest_first_and_unfinished_oldest_first(tmp_path):
    store = SQLiteStore(tmp_path / "db.sqlite3")
    await store.open()
    now = time.time()
    await store.create([sub("old", 1, now - 3), sub("mid", 3, now - 2), sub("new", 2, now - 1)])
    page, total = await store.page(0, 2)
    assert total == 3 and [s["token"] for s in page] == ["new", "mid"]
    assert await store.unfinished() == ["old", "new"]
    assert (await store.delete("mid"))["token"] == "mid"
    assert await store.get_many(["mid", "old"]) == [None, await store.get("old")]
    await store.close()
