"""The open WebSockets of one process: one registry per service, one idle sweeper for all of them."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Socket(Protocol):
    last_activity: float  # time.monotonic() of the last message either way
    last_heard: float  # time.monotonic() of the last frame from the client, pongs included
    sent_seq: int

    def ping(self, data: bytes = b"") -> None: ...

    def close(self, code: int | None = None, reason: str | None = None) -> None: ...

    def stalled(self, now: float) -> bool:
        """Whether a message has waited too long to be flushed (the client stopped reading)."""


class SocketRegistry:
    """Tracks open sockets so the service can close them on shutdown (1001), idle ones (1000) and stalled
    ones (1013: the client stopped reading; it resumes with since), and pings them all every
    `ping_interval`, closing those that have not answered for two intervals. One task does it for every
    socket (tornado's own pinging costs a task and a timer per connection)."""

    def __init__(self, idle_timeout: float, send_timeout: float, ping_interval: float = 0.0):
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        self.ping_interval = ping_interval
        self.open: set[Socket] = set()
        self._sweeper: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self.open)

    def add(self, sock: Socket) -> None:
        self.open.add(sock)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep_idle())

    def discard(self, sock: Socket) -> None:
        self.open.discard(sock)

    def close_all(self) -> None:
        """Server shutdown: every open socket is closed with 1001 (going away); clients resume with since."""
        for sock in list(self.open):
            sock.close(1001, "server shutting down")
        self.open.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def _sweep_idle(self) -> None:
        periods = [self.idle_timeout / 2, self.send_timeout / 2, 15.0]
        if self.ping_interval > 0:
            periods.append(self.ping_interval)
        period = min(periods)
        last_ping = time.monotonic()
        while self.open:
            await asyncio.sleep(period)
            now = time.monotonic()
            ping = self.ping_interval > 0 and now - last_ping >= self.ping_interval
            for sock in list(self.open):
                if sock.stalled(now):
                    self.open.discard(sock)
                    sock.close(1013, "client too slow; resume with ?since=%d" % max(0, sock.sent_seq - 1))
                elif now - sock.last_activity > self.idle_timeout:
                    self.open.discard(sock)
                    sock.close(1000, "idle")
                elif self.ping_interval > 0 and now - sock.last_heard > 2 * self.ping_interval:
                    self.open.discard(sock)
                    sock.close(1001, "no answer to pings")
                elif ping:
                    sock.ping()
            if ping:
                last_ping = now
