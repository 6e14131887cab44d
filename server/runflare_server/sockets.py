"""The open WebSockets of one process: one registry per service, one idle sweeper for all of them."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Socket(Protocol):
    last_activity: float  # time.monotonic() of the last message either way

    def close(self, code: int | None = None, reason: str | None = None) -> None: ...


class SocketRegistry:
    """Tracks open sockets so the service can close them on shutdown (1001) and idle ones (1000)."""

    def __init__(self, idle_timeout: float):
        self.idle_timeout = idle_timeout
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
        while self.open:
            await asyncio.sleep(min(self.idle_timeout / 2, 15.0))
            now = time.monotonic()
            for sock in [s for s in self.open if now - s.last_activity > self.idle_timeout]:
                self.open.discard(sock)
                sock.close(1000, "idle")
