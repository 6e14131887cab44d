"""A multi-process WebSocket client, so the client is not the bottleneck of a server-side figure.

``Clients(url, total, processes)`` spreads ``total`` sockets over ``processes`` forked processes, each on its
own event loop. ``open()`` connects them all; then either ``start_follow()`` and ``results()`` (latency samples of the
printed timestamps, until the server closes) or ``close()`` (idle sockets, hung up).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time
from multiprocessing.connection import Connection
from typing import Any

import websockets


def _samples(raw: str | bytes, now: float, out: list[float]) -> None:
    """Append now minus every time.time() the program printed in this stdout event."""
    message = json.loads(raw)
    if message.get("stream") != "stdout":
        return
    for line in message.get("text", "").split():
        try:
            out.append(now - float(line))
        except ValueError:
            continue


async def _worker(conn: Connection, url: str, count: int) -> None:
    loop = asyncio.get_running_loop()
    sockets: list[Any] = []
    for start in range(0, count, 250):
        sockets += await asyncio.gather(*(websockets.connect(url, max_size=None, open_timeout=120)
                                          for _ in range(min(250, count - start))))
    conn.send(len(sockets))
    command = await loop.run_in_executor(None, conn.recv)
    if command == "follow":
        async def follow(ws: Any) -> list[float]:
            out: list[float] = []
            async for raw in ws:
                _samples(raw, time.time(), out)
            return out

        per_socket = await asyncio.gather(*(follow(ws) for ws in sockets))
        conn.send([x for s in per_socket for x in s])
    else:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        conn.send([])


def _main(conn: Connection, url: str, count: int) -> None:
    asyncio.run(_worker(conn, url, count))


class Clients:
    """``total`` WebSocket clients of ``url`` in ``processes`` processes."""

    def __init__(self, url: str, total: int, processes: int) -> None:
        processes = max(1, min(processes, total))
        ctx = multiprocessing.get_context("fork")  # called with no event loop running: a clean copy, fast
        self.pipes: list[Connection] = []
        self.procs = []
        for i in range(processes):
            mine, theirs = ctx.Pipe()
            share = total // processes + (1 if i < total % processes else 0)
            proc = ctx.Process(target=_main, args=(theirs, url, share), daemon=True)
            proc.start()
            self.pipes.append(mine)
            self.procs.append(proc)

    def open(self, timeout: float = 600) -> int:
        """Wait until every process has connected its sockets; how many are open."""
        opened = 0
        for pipe in self.pipes:
            if not pipe.poll(timeout):
                raise TimeoutError("a client process did not connect its sockets")
            opened += pipe.recv()
        return opened

    def _send(self, command: str) -> None:
        for pipe in self.pipes:
            pipe.send(command)

    def results(self, timeout: float = 300) -> list[float]:
        """What every process sent back once done."""
        out: list[float] = []
        for pipe in self.pipes:
            if not pipe.poll(timeout):
                raise TimeoutError("a client process did not finish")
            out += pipe.recv()
        for proc in self.procs:
            proc.join(30)
        return out

    def start_follow(self) -> None:
        """Let every socket read until the server closes it; ``results()`` then has the latency samples."""
        self._send("follow")

    def close(self, timeout: float = 120) -> None:
        """Hang every socket up."""
        self._send("close")
        self.results(timeout)
