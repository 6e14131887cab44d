"""A kernel client that refuses oversized kernel messages before they reach the event loop.

Every socket the client makes gets ZMQ's ``MAXMSGSIZE`` before it connects (a default of the client's own
ZMQ context). A message frame larger than that makes ZMQ's I/O thread drop the connection at once: the
frame is never copied to the event loop, never JSON-decoded. ZMQ treats it as a protocol error and does
not reconnect, so the kernel's later messages on that channel are lost too; a monitor on the iopub, shell
and stdin sockets tells the run (``refused()``) and the run ends with a clear message, its kernel discarded.

Clients of one bound share one ZMQ context (one I/O thread) for the life of the process: a context per
client cost a thread's start and a blocking ``term()`` on the event loop for every kernel.

The bound is ``4 * max_output_bytes + 64 KiB``: a run keeps at most ``max_output_bytes`` of output, and a
legitimate message carrying that much stays under the bound even with base64 (the program-run kernel's
reply) or JSON escapes. ZMQ applies it per frame: a Jupyter message has four JSON frames and, rarely,
binary buffers (widgets) which are not decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.asynchronous import AsyncKernelClient
from zmq.utils.monitor import recv_monitor_message

from runflare_server.engine.interface import Limits

HEADROOM = 64 * 1024
SETTLE = 0.25  # seconds after a disconnect with no reconnect attempt: the connection was refused, not lost
_WATCHED = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_DELAYED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_CONNECTED
_output_cap = Limits().max_output_bytes
_monitor_ids = itertools.count()
_contexts: dict[tuple[int, int], zmq.asyncio.Context] = {}  # (pid, bound) -> the clients' shared context


def message_bound(max_output_bytes: int | None = None) -> int:
    """The largest kernel message frame accepted for runs keeping ``max_output_bytes`` of output."""
    return 4 * (max_output_bytes or _output_cap) + HEADROOM


def allow_output(max_output_bytes: int) -> None:
    """Size the clients made from now on in this process for runs keeping up to ``max_output_bytes``
    (the server's output cap; it only ever grows, so one engine never shrinks another's bound)."""
    global _output_cap
    _output_cap = max(_output_cap, int(max_output_bytes))


def shared_context(bound: int) -> zmq.asyncio.Context:
    """This process's ZMQ context for clients bounded at ``bound`` bytes per frame (made on first use; a
    forked child makes its own)."""
    key = (os.getpid(), bound)
    context = _contexts.get(key)
    if context is None or context.closed:
        context = _contexts[key] = zmq.asyncio.Context()
        context.setsockopt(zmq.MAXMSGSIZE, bound)  # a default for every socket this context makes
        context.setsockopt(zmq.LINGER, 0)  # nothing to a killed kernel is worth waiting for at close
        # a kernel binds its sockets a moment after the client connects: retry every 10 ms, not ZMQ's 100
        context.setsockopt(zmq.RECONNECT_IVL, 10)
    return context


class BoundedKernelClient(AsyncKernelClient):
    """An ``AsyncKernelClient`` whose sockets refuse messages over ``max_message_bytes`` (default:
    ``message_bound()``). Its sockets live in the shared context of that bound; ``stop_channels`` closes
    them and their monitors."""

    def __init__(self, *, max_message_bytes: int | None = None, **kwargs: Any) -> None:
        bound = int(max_message_bytes or message_bound())
        super().__init__(context=shared_context(bound), **kwargs)
        self.max_message_bytes = bound
        self._monitors: dict[str, zmq.Socket] = {}
        self._watched: list[tuple[zmq.Socket, zmq.Socket]] = []  # (channel socket, its monitor's PAIR)
        self._cut_at: dict[str, float] = {}

    def execute_with(self, code: str, metadata: dict[str, Any], *, allow_stdin: bool, stop_on_error: bool) -> str:
        """Send an execute_request (not silent, no history) whose metadata carries what Run-Flare's kernels
        read there (``execute`` sends none); its msg_id."""
        content = {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                   "allow_stdin": allow_stdin, "stop_on_error": stop_on_error}
        msg = self.session.msg("execute_request", content, metadata=metadata)
        self.shell_channel.send(msg)
        return msg["header"]["msg_id"]

    async def next_msg(self, channel: str, timeout: float | None = None) -> dict[str, Any]:
        """The next message on ``channel`` ("iopub", "shell" or "stdin"), decoded; ``TimeoutError`` when none
        comes within ``timeout`` seconds (None: wait as long as it takes). One receive future and one timer a
        message: jupyter_client's ``get_*_msg`` polls first (a poller, more futures and a timer), about 50 µs
        more of the event loop a message here. A receive given up never takes a message: pyzmq skips it."""
        received = getattr(self, f"{channel}_channel").socket.recv_multipart()
        if received.done() or timeout is None:
            frames = await received
        else:
            expired: list[bool] = []

            def expire() -> None:
                expired.append(True)
                received.cancel()

            timer = asyncio.get_running_loop().call_later(timeout, expire)
            try:
                frames = await received
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not expired or getattr(task, "cancelling", lambda: 0)():
                    raise  # the caller was cancelled
                raise TimeoutError(f"no {channel} message within {timeout} s") from None
            finally:
                timer.cancel()
        _, msg = self.session.feed_identities(frames)
        return self.session.deserialize(msg)

    def _watch(self, channel: str, sock: zmq.Socket) -> zmq.Socket:
        # A name of its own: pyzmq's default (the socket's fd number) can still be bound by an earlier
        # monitor whose socket had that fd ("Address already in use")
        monitor = sock.get_monitor_socket(_WATCHED, f"inproc://runflare-monitor-{next(_monitor_ids)}")
        self._monitors[channel] = zmq.Socket.shadow(monitor.underlying)  # a blocking view, read with NOBLOCK
        self._watched.append((sock, monitor))
        return sock

    def connect_iopub(self, identity: bytes | None = None) -> zmq.Socket:
        return self._watch("iopub", super().connect_iopub(identity=identity))

    def connect_shell(self, identity: bytes | None = None) -> zmq.Socket:
        return self._watch("shell", super().connect_shell(identity=identity))

    def connect_stdin(self, identity: bytes | None = None) -> zmq.Socket:
        return self._watch("stdin", super().connect_stdin(identity=identity))

    def refused(self) -> str | None:
        """The channel whose connection ZMQ cut because the kernel sent a frame over the bound (or a
        malformed one), else None. A kernel that exits also cuts its connections, but then ZMQ tries to
        reconnect at once; a refused connection stays cut (seen ``SETTLE`` seconds after the cut)."""
        now = time.monotonic()
        for channel, monitor in self._monitors.items():
            while True:
                try:
                    event = recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
                except zmq.ZMQError:  # Again: nothing more; or the monitor is closed
                    break
                if event == zmq.EVENT_DISCONNECTED:
                    self._cut_at.setdefault(channel, now)
                else:
                    self._cut_at.pop(channel, None)
        for channel, at in self._cut_at.items():
            if now - at >= SETTLE:
                return channel
        return None

    def stop_channels(self) -> None:
        self._monitors.clear()
        for sock, monitor in self._watched:
            with contextlib.suppress(zmq.ZMQError):
                if not sock.closed:
                    sock.disable_monitor()
                monitor.close(linger=0)
        self._watched.clear()
        super().stop_channels()  # closes the channels' sockets; the shared context stays
