"""The broker interface: a work queue of tokens, an ordered event log per submission, interactive stdin."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol

Event = dict[str, Any]


class Broker(Protocol):
    async def enqueue(self, token: str) -> None: ...

    async def dequeue(self) -> str:
        """The next queued token; waits while the queue is empty."""

    async def ack(self, token: str) -> None:
        """The token's run is over (its final state is stored)."""

    async def depth(self) -> int:
        """Tokens waiting in the queue."""

    async def publish(self, token: str, event: Event, final: bool = False) -> Event:
        """Append an event to the token's log, stamping `seq`; `final` closes the log."""

    def has_log(self, token: str) -> bool: ...

    def subscribe(self, token: str, since: int = 0) -> AsyncIterator[Event]:
        """Events with seq > since, replayed then live, ending after the final one."""

    def last_seq(self, token: str) -> int: ...

    async def send_input(self, token: str, chunk: str | None) -> bool:
        """Feed an interactive run's stdin (None = end of input); False if the run is not reading."""

    def open_input(self, token: str) -> asyncio.Queue[str | None]:
        """The queue a running interactive submission reads its stdin from."""

    def close_input(self, token: str) -> None: ...
