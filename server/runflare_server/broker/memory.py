"""In-process broker: an asyncio queue of tokens and an in-memory event log per submission.

Subscribers pull from the shared log with their own cursor, so a slow client costs no memory;
finished logs are kept for `retention` seconds (then the WebSocket replays from the store).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

from .base import Event


class LoggedEvent(dict):
    """An event with its JSON text, encoded once however many clients receive it."""

    __slots__ = ("raw",)

    def __init__(self, event: Event):
        super().__init__(event)
        self.raw = json.dumps(self)


class EventLog:
    """One submission's events, in order; seq = position + 1."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.closed_at: float | None = None
        self._changed = asyncio.Event()

    def append(self, event: Event, final: bool) -> Event:
        event = LoggedEvent({**event, "seq": len(self.events) + 1})
        self.events.append(event)
        if final:
            self.closed_at = time.monotonic()
        self._changed.set()
        self._changed = asyncio.Event()
        return event

    async def changed(self) -> None:
        await self._changed.wait()


class MemoryBroker:
    """The embedded broker."""

    def __init__(self, retention: float = 600.0, max_logs: int = 10_000):
        self.retention = retention
        self.max_logs = max_logs
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._logs: OrderedDict[str, EventLog] = OrderedDict()
        self._inputs: dict[str, asyncio.Queue[str | None]] = {}

    async def enqueue(self, token: str) -> None:
        self._queue.put_nowait(token)

    async def dequeue(self) -> str:
        return await self._queue.get()

    async def ack(self, token: str) -> None:
        self._queue.task_done()

    async def depth(self) -> int:
        return self._queue.qsize()

    async def publish(self, token: str, event: Event, final: bool = False) -> Event:
        log = self._logs.get(token)
        if log is None or (log.closed_at is not None and not final):
            log = self._logs[token] = EventLog()  # a re-queued run starts a new story
            self._evict()
        return log.append(event, final)

    def has_log(self, token: str) -> bool:
        return token in self._logs

    def last_seq(self, token: str) -> int:
        log = self._logs.get(token)
        return len(log.events) if log else 0

    async def subscribe(self, token: str, since: int = 0) -> AsyncIterator[Event]:
        log = self._logs.get(token)
        if log is None:
            return
        cursor = max(0, since)
        while True:
            while cursor < len(log.events):
                event = log.events[cursor]
                cursor += 1
                yield event
            if log.closed_at is not None:
                return
            await log.changed()

    async def send_input(self, token: str, chunk: str | None) -> bool:
        self.open_input(token).put_nowait(chunk)  # input sent before the run starts waits for it
        return True

    def open_input(self, token: str) -> asyncio.Queue[str | None]:
        return self._inputs.setdefault(token, asyncio.Queue())

    def close_input(self, token: str) -> None:
        self._inputs.pop(token, None)

    def _evict(self) -> None:
        now = time.monotonic()
        for token in list(self._logs):
            log = self._logs[token]
            expired = log.closed_at is not None and now - log.closed_at > self.retention
            if not expired and len(self._logs) <= self.max_logs:
                break
            if log.closed_at is not None:
                del self._logs[token]
