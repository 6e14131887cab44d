"""The events of one run on their way to the broker: sent in order by one task, and those emitted while a
send is out go together in the next one (one round trip to a shared broker, one wake-up of each reader)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .broker import Broker
from .broker.base import BrokerUnavailable, Event

log = logging.getLogger(__name__)

MAX_PENDING = 256  # events waiting for a send before emit waits too (a run that outpaces the broker)


class EventSender:
    """Send a run's events in order without making the run wait for each send. Events are live news:
    when the broker is down they are dropped (the store keeps the result)."""

    def __init__(self, broker: Broker, token: str) -> None:
        self.broker = broker
        self.token = token
        self._pending: list[Event] = []
        self._sending: asyncio.Task | None = None

    async def emit(self, event: Event) -> None:
        """Queue the event; it is sent as soon as the send before it is done."""
        self._pending.append(event)
        if self._sending is None or self._sending.done():
            self._sending = asyncio.ensure_future(self._send_pending())
        elif len(self._pending) >= MAX_PENDING:
            await asyncio.shield(self._sending)

    async def close(self, *last: Event, result: dict[str, Any] | None = None) -> None:
        """Send what is queued and then `last`, the final event last (it ends the stream); `result` is the
        submission as stored, for a node waiting for it."""
        await self.drain()
        events, self._pending = [*self._pending, *last], []
        await self._send(events, final=True, result=result)

    async def drain(self) -> None:
        """Wait until what was emitted is sent (a run given up: a retry's events come after these)."""
        if self._sending is not None:
            await asyncio.shield(self._sending)

    async def _send_pending(self) -> None:
        while self._pending:
            events, self._pending = self._pending, []
            await self._send(events, final=False)

    async def _send(self, events: list[Event], final: bool, result: dict[str, Any] | None = None) -> None:
        try:
            await self.broker.publish_many(self.token, events, final=final, result=result)
        except BrokerUnavailable as exc:
            log.warning("%d events for %s dropped: %s", len(events), self.token, exc)
        except Exception:  # the run and its stored result go on without them
            log.exception("%d events for %s dropped", len(events), self.token)
