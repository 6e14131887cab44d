"""The worker overlaps a run's result write with the next run: a real SQLite store whose final write of one
submission is held, a real in-process queue, real Run-Flare kernels (program runs), one worker loop.

While the first submission's result waits for the store, the next submission runs and is stored; the first
is acknowledged (leaves the queue's tracking) only once its result is durable, and nothing is lost. A store
that refuses the "Processing" write costs that status only: the run goes on and its result is stored."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from runflare_server.broker.memory import MemoryBroker
from runflare_server.callbacks import Callbacks
from runflare_server.config import Settings
from runflare_server.engine.runs.program_runs import ProgramRuns
from runflare_server.models import SubmissionRules
from runflare_server.statuses import ACCEPTED, IN_QUEUE, PROCESSING
from runflare_server.store import SQLiteStore, StoreUnavailable
from runflare_server.submissions import Submissions
from runflare_server.worker import Worker

HANG_BOUND = 60  # seconds; only fails a run that hangs


class HeldStore(SQLiteStore):
    """The real SQLite store; the final write of the tokens in `held` waits until `release` is set, and
    "Processing" writes of the tokens in `refuse` fail as an unreachable store would."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.held: set[str] = set()
        self.refuse: set[str] = set()
        self.release = asyncio.Event()
        self.waiting = asyncio.Event()

    async def update(self, token: str, changes: dict[str, Any]) -> Any:
        if token in self.refuse and changes.get("status_id") == PROCESSING:
            raise StoreUnavailable("refused for the test")
        if token in self.held and "finished_at" in changes:
            self.waiting.set()
            await self.release.wait()
        return await super().update(token, changes)


async def started(tmp_path: Path) -> tuple[HeldStore, MemoryBroker, ProgramRuns, Worker, Submissions]:
    settings = Settings(data_dir=tmp_path / "data")
    store = HeldStore(tmp_path / "runflare.db")
    await store.open()
    broker = MemoryBroker()
    await broker.open()
    engine = ProgramRuns(1, runs_dir=str(tmp_path))
    await engine.start()
    worker = Worker(settings, store, broker, engine, Callbacks(1, 1.0), lambda sub: {}, concurrency=1)
    worker.start()
    return store, broker, engine, worker, Submissions(settings, store, broker, SubmissionRules(settings, {71}, set()))


async def stopped(store: HeldStore, broker: MemoryBroker, engine: ProgramRuns, worker: Worker) -> None:
    store.release.set()
    await worker.stop(drain_timeout=10)
    await engine.stop()
    await broker.close()
    await store.close()


async def final(store: HeldStore, token: str) -> dict:
    async def poll() -> dict:
        while True:
            sub = await store.get(token)
            if sub is not None and sub["status_id"] > PROCESSING:
                return sub
            await asyncio.sleep(0.02)

    return await asyncio.wait_for(poll(), HANG_BOUND)


async def create(subs: Submissions, *sources: str) -> list[str]:
    answers = await subs.create_many([{"source_code": s, "language_id": 71} for s in sources], False)
    return [a["token"] for a in answers]


async def test_next_run_does_not_wait_for_the_previous_result(tmp_path):
    store, broker, engine, worker, subs = await started(tmp_path)
    try:
        first, second = await create(subs, 'print("first")', 'print("second")')
        store.held.add(first)
        done = await final(store, second)
        assert done["status_id"] == ACCEPTED and done["stdout"] == "second\n"
        assert store.waiting.is_set()
        held = await store.get(first)
        assert held is not None and held["status_id"] in (IN_QUEUE, PROCESSING)  # its result is not stored yet
        assert first in await broker.tracked(), "acknowledged before its result was stored"
        store.release.set()
        done = await final(store, first)
        assert done["status_id"] == ACCEPTED and done["stdout"] == "first\n"
    finally:
        await stopped(store, broker, engine, worker)


async def test_a_loop_holds_one_result_being_stored(tmp_path):
    store, broker, engine, worker, subs = await started(tmp_path)
    try:
        first, second, third = await create(subs, "print(1)", "print(2)", "print(3)")
        store.held.add(first)
        await asyncio.wait_for(store.waiting.wait(), HANG_BOUND)
        await final(store, second)
        await asyncio.sleep(0.5)  # the third would have run by now if the loop did not wait for the first
        assert engine.stats["runs"] == 2
        assert (await store.get(third))["status_id"] == IN_QUEUE
        store.release.set()
        assert (await final(store, third))["stdout"] == "3\n"
        assert (await final(store, first))["stdout"] == "1\n"
    finally:
        await stopped(store, broker, engine, worker)


async def test_a_refused_processing_write_loses_nothing(tmp_path):
    store, broker, engine, worker, subs = await started(tmp_path)
    try:
        (token,) = await create(subs, 'print("kept")')
        store.refuse.add(token)
        done = await final(store, token)
        assert done["status_id"] == ACCEPTED and done["stdout"] == "kept\n"
        statuses = [e["status"]["id"] async for e in broker.subscribe(token) if e["type"] == "status_update"]
        assert statuses[:2] == [IN_QUEUE, PROCESSING] and statuses[-1] == ACCEPTED
    finally:
        await stopped(store, broker, engine, worker)
