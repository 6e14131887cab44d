"""One reader per followed submission, pushing its events to every WebSocket that follows it.

A socket holds only a cursor (the last seq it was sent) and whether a message is in flight: no task, no
coroutine and no queue per socket. The fan-out reads the broker's stream once per process and keeps
references to its events (encoded once, shared with the broker's log), so a client joining late with any
`since` is replayed from here. An event goes straight into each idle socket's kernel buffer (no future, no
callback), so a live event to a hundred clients costs a hundred `send`s and little else. A client whose
buffer is full has at most one message in flight: a client that reads slowly costs a cursor, never a
growing buffer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from .broker.base import BrokerUnavailable

log = logging.getLogger(__name__)

MAX_INLINE = 64  # events one pump writes straight into a socket before it waits for a flush


class Follower(Protocol):
    """What the fan-out needs of a socket."""

    sent_seq: int  # the last seq this client was sent
    inflight_since: float | None  # time.monotonic() the message in flight was written, None when idle

    def send_event(self, event: Any, now: bool) -> asyncio.Future | bool:
        """Write one event. True: it is already in the kernel's socket buffer (only tried when `now`); a
        future: it resolves once the event is flushed; False: the socket is closed."""

    def finished(self, code: int, reason: str) -> None:
        """The stream ended (1000) or failed (1013): close with this code."""


class Fanout:
    """The events of one submission and the sockets following it."""

    def __init__(self, broker: Any, token: str, on_empty: Any):
        self.token = token
        self.events: list[Any] = []
        self.followers: set[Follower] = set()
        self.ended: tuple[int, str] | None = None
        self._on_empty = on_empty
        self._reader = asyncio.create_task(self._read(broker))

    def add(self, follower: Follower) -> None:
        self.followers.add(follower)
        self.pump(follower)

    def discard(self, follower: Follower) -> None:
        self.followers.discard(follower)
        if not self.followers:
            self._reader.cancel()
            self._on_empty(self)

    async def _read(self, broker: Any) -> None:
        try:
            async for event in broker.subscribe(self.token, 0):
                self.events.append(event)
                for follower in list(self.followers):
                    if follower.inflight_since is None:
                        self.pump(follower)
            self.ended = (1000, "submission finished")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the broker is unreachable (or failed): clients resume with since
            if not isinstance(exc, BrokerUnavailable):
                log.exception("event stream of %s failed", self.token)
            self.ended = (1013, "events unavailable; resume with ?since=%d")
        for follower in list(self.followers):
            if follower.inflight_since is None:
                self.pump(follower)

    def pump(self, follower: Follower) -> None:
        """Send the follower the events it has not had, while each goes straight into its socket (at most
        MAX_INLINE in one call, so a long replay yields to the loop); the first that does not is left in
        flight. With nothing left to send at the end, close it."""
        index = self._index_after(follower.sent_seq)
        inline = 0
        while index < len(self.events):
            event = self.events[index]
            sent = follower.send_event(event, now=inline < MAX_INLINE)
            if sent is False:
                return
            follower.sent_seq = event["seq"]
            if sent is not True:
                follower.inflight_since = time.monotonic()
                sent.add_done_callback(lambda future: self._flushed(follower, future))
                return
            index += 1
            inline += 1
        if self.ended is not None:
            code, reason = self.ended
            follower.finished(code, reason % follower.sent_seq if "%d" in reason else reason)

    def _flushed(self, follower: Follower, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is not None:
            return  # the socket closed under the write; on_close takes it out
        follower.inflight_since = None
        if follower in self.followers:
            self.pump(follower)

    def _index_after(self, seq: int) -> int:
        """Position of the first event with a seq above `seq` (seqs rise by one from the first held)."""
        if not self.events:
            return 0
        first = self.events[0]["seq"]
        return max(0, min(len(self.events), seq - first + 1))


class Fanouts:
    """The fan-outs of one process, by token; a fan-out ends when its last follower leaves."""

    def __init__(self, broker: Any):
        self.broker = broker
        self.by_token: dict[str, Fanout] = {}

    def follow(self, token: str, follower: Follower) -> Fanout:
        fanout = self.by_token.get(token)
        if fanout is None:
            fanout = self.by_token[token] = Fanout(self.broker, token, self._gone)
        fanout.add(follower)
        return fanout

    def _gone(self, fanout: Fanout) -> None:
        if self.by_token.get(fanout.token) is fanout:
            del self.by_token[fanout.token]
