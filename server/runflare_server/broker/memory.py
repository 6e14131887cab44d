"""In-process broker: an asyncio queue of tokens and an in-memory event log per submission.

Subscribers pull from the shared log with their own cursor, so a slow client costs no memory.
Finished logs are kept for `retention` seconds, fewer when they pass `max_logs` or `max_bytes` in all
(then the WebSocket tells the stored result instead).
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator
from typing import Any

from .base import Event, Job


class LoggedEvent(dict):
    """An event with its JSON text, encoded once however many clients receive it, and its WebSocket
    frame, built once on first use."""

    __slots__ = ("raw", "_frame")

    def __init__(self, event: Event):
        super().__init__(event)
        self.raw = json.dumps(self)
        self._frame: bytes | None = None

    @property
    def frame(self) -> bytes:
        """The event as one unmasked WebSocket text frame (a server's, RFC 6455 section 5.2)."""
        if self._frame is None:
            self._frame = text_frame(self.raw)
        return self._frame


def text_frame(text: str) -> bytes:
    """One final, unmasked, uncompressed WebSocket text frame carrying ``text``."""
    payload = text.encode("utf-8")
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x81, n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + payload


class EventLog:
    """One submission's events, in order; seq = position + 1."""

    def __init__(self) -> None:
        self.events: list[LoggedEvent] = []
        self.closed_at: float | None = None
        self.size = 0  # bytes of encoded events
        self._changed = asyncio.Event()

    def append(self, event: Event, final: bool) -> LoggedEvent:
        event = LoggedEvent({**event, "seq": len(self.events) + 1})
        self.size += len(event.raw)
        self.events.append(event)
        if final:
            self.closed_at = time.monotonic()
        self._changed.set()
        self._changed = asyncio.Event()
        return event

    async def changed(self) -> None:
        await self._changed.wait()


class InputQueue(asyncio.Queue):
    """An interactive run's pending stdin, counting the bytes it holds (the broker's InputChannel)."""

    def __init__(self, on_close: Any = None) -> None:
        super().__init__()
        self.pending = 0
        self._on_close = on_close

    async def close(self) -> None:
        if self._on_close is not None:
            self._on_close()

    def _put(self, item: str | None) -> None:
        self.pending += max(1, len(item or ""))  # an empty chunk or end-of-input counts too
        super()._put(item)

    def _get(self) -> str | None:
        item = super()._get()
        self.pending -= max(1, len(item or ""))
        return item


class MemoryBroker:
    """The embedded broker: one process's queue, logs and stdin."""

    kind = "memory"

    def __init__(self, retention: float = 600.0, max_logs: int = 10_000, max_bytes: int = 256 << 20,
                 max_pending_input: int = 1 << 20):
        self.retention = retention
        self.max_logs = max_logs
        self.max_bytes = max_bytes
        self.max_pending_input = max_pending_input
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._logs: OrderedDict[str, EventLog] = OrderedDict()
        self._closed: deque[tuple[float, str]] = deque()  # (closed_at, token) of finished logs, oldest first
        self._bytes = 0
        self._inputs: dict[str, InputQueue] = {}
        self._tracked: Counter[str] = Counter()  # queued or taken, not yet acknowledged
        self._catalog: dict[str, Any] | None = None

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> bool:
        return True

    async def enqueue(self, token: str) -> None:
        self._tracked[token] += 1
        self._queue.put_nowait(token)

    async def dequeue(self) -> Job:
        return Job(await self._queue.get())

    async def ack(self, job: Job) -> None:
        self._tracked[job.token] -= 1
        if self._tracked[job.token] <= 0:
            del self._tracked[job.token]
        self._queue.task_done()

    async def tracked(self) -> set[str]:
        """Tokens queued or taken and not yet acknowledged."""
        return set(self._tracked)

    async def try_lock(self, name: str, ttl: float) -> bool:
        """One process: nobody else can hold it."""
        return True

    async def set_catalog(self, catalog: dict[str, Any]) -> None:
        self._catalog = catalog

    async def catalog(self) -> dict[str, Any] | None:
        return self._catalog

    async def depth(self) -> int:
        return self._queue.qsize()

    async def publish(self, token: str, event: Event, final: bool = False) -> Event:
        log = self._logs.get(token)
        if log is None:
            log = self._logs[token] = EventLog()
        elif log.closed_at is not None and not final:
            log.closed_at = None  # a re-queued run goes on with the same story, seq still rising
        before = log.size
        logged = log.append(event, final)
        self._bytes += log.size - before
        if final:
            self._closed.append((log.closed_at, token))  # type: ignore[arg-type]
        if final or len(self._logs) > self.max_logs or self._bytes > self.max_bytes:
            self._evict()
        return logged

    async def publish_many(self, token: str, events: list[Event], final: bool = False,
                           result: dict[str, Any] | None = None) -> list[Event]:
        return [await self.publish(token, event, final and i == len(events) - 1) for i, event in enumerate(events)]

    async def announce(self, token: str, events: list[Event], watch: bool = False) -> list[Event]:
        published = await self.publish_many(token, events)
        await self.enqueue(token)
        return published

    async def wait_final(self, token: str) -> dict[str, Any] | None:
        async for _event in self.subscribe(token):  # it ends after the final event
            pass
        return None  # the store is in this process too

    async def has_log(self, token: str) -> bool:
        return token in self._logs

    async def last_seq(self, token: str) -> int:
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
        queue = self._input(token)  # input sent before the run starts waits for it
        if queue.pending + max(1, len(chunk or "")) > self.max_pending_input:
            return False
        queue.put_nowait(chunk)
        return True

    async def open_input(self, token: str) -> InputQueue:
        return self._input(token)

    def _input(self, token: str) -> InputQueue:
        queue = self._inputs.get(token)
        if queue is None:
            queue = self._inputs[token] = InputQueue(lambda: self._inputs.pop(token, None))
        return queue

    def _evict(self) -> None:
        """Drop finished logs, oldest first: the expired ones, and more while over a budget. Only the head of
        the finished logs is looked at, however many logs are kept (this runs at every run's end)."""
        now = time.monotonic()
        while self._closed:
            closed_at, token = self._closed[0]
            log = self._logs.get(token)
            if log is None or log.closed_at != closed_at:  # gone, or reopened (a later close is queued anew)
                self._closed.popleft()
                continue
            over = len(self._logs) > self.max_logs or self._bytes > self.max_bytes
            if not over and now - closed_at <= self.retention:
                return
            self._closed.popleft()
            del self._logs[token]
            self._bytes -= log.size
