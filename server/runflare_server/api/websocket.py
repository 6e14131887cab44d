"""GET /api/v1/submissions/{token}/ws: replay the submission's events from `since`, then stream live ones."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from typing import Any

from tornado import websocket
from tornado.iostream import IOStream, StreamClosedError

from .. import events
from ..statuses import is_final
from .access_log import ScrubbedRequestLogs
from .base import INTEGER, ApiError, allowed_origin, check_auth, raw_query, unavailable

log = logging.getLogger(__name__)


MAX_INBOX_MESSAGES = 256  # stdin messages a socket may have waiting for the broker
MAX_UNREAD_REPLIES = 16  # pongs and errors a socket may have unflushed before it gets no more


# The attributes tornado (6.x) gives an open WebSocketHandler, in the order it sets them: RequestHandler's
# __init__ and clear(), WebSocketHandler's __init__, _execute(), get(), and the methods _detach_stream()
# disables on the instance.
TORNADO_ATTRIBUTES = (
    "application", "request", "_headers_written", "_finished", "_auto_finish", "_prepared_future", "ui",
    "_headers", "_write_buffer", "_status_code", "_reason", "ws_connection", "close_code", "close_reason",
    "_on_close_called", "_transforms", "path_args", "path_kwargs", "open_args", "open_kwargs",
    "write", "redirect", "set_header", "set_cookie", "set_status", "flush", "finish",
)


def share_instance_keys(cls: type, names: Iterable[str]) -> None:
    """Enter `names` in the key table CPython shares between the instance dicts of `cls`, before any instance
    exists. An instance whose attributes are all in that table has a compact dict of values (288 bytes for
    tornado's 27 attributes); one with an attribute outside it gets a dict of its own (832 bytes). The table
    holds at most 30 names, and CPython (3.11) takes one of its free places for each instance created; a
    socket's prepare() awaits the store, so many sockets are created before the first has all of tornado's
    attributes: left alone, the table closes too early and every socket has a dict of its own. A name
    tornado no longer sets only costs a place in the table."""
    probe = object.__new__(cls)  # never initialized: it only enters the names
    for name in names:
        setattr(probe, name, None)


class StdinInbox:
    """The stdin messages a socket has received and not yet handed to the broker. Made on the socket's
    first stdin message (an idle socket has none); its one feeder task keeps the chunks in order."""

    __slots__ = ("queue", "bytes", "run_over", "feeder")

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[dict[str, Any], int] | None] = asyncio.Queue()
        self.bytes = 0  # stdin received and not yet handed to the broker
        self.run_over = False  # known once: a flood after the run's end costs no store reads
        self.feeder: asyncio.Task | None = None


class SubmissionSocket(ScrubbedRequestLogs, websocket.WebSocketHandler):
    """One client following one submission.

    Each client pulls from the shared log with its own cursor and has at most one message in flight, so a
    client that lags costs no memory; one whose socket stops draining for ws_send_timeout is closed with 1013.

    The socket's own state is in slots, so its instance dict holds only tornado's 27 attributes, all in the
    key table its instances share (``share_instance_keys``, which has room for 30): an idle socket's dict
    is 288 bytes, not 832.
    """

    __slots__ = ("token", "live", "interactive", "sent_seq", "inflight_since", "unread_replies",
                 "last_activity", "last_heard", "fanout", "replayer", "inbox")

    def initialize(self) -> None:
        """What on_close looks at, set before anything can close the connection (a client may hang up
        while prepare() awaits, before open())."""
        self.fanout: Any = None  # a live run's fan-out, which this socket follows
        self.replayer: asyncio.Task | None = None  # a finished run's stored status, on its way
        self.inbox: StdinInbox | None = None  # made on the first stdin message

    @property
    def service(self) -> Any:
        return self.application.settings["service"]

    async def prepare(self) -> None:
        """Everything before the upgrade: a plain HTTP answer for a wrong method, auth, since, an unknown
        token or a request that is not an upgrade; otherwise tornado's own get() upgrades. Done here, not in
        an overriding get(), because get()'s frame lives as long as the connection."""
        if self.request.method != "GET":  # 405 with Allow, like every route
            self.set_header("Allow", "GET")
            return self.answer(405, {"error": f"method {self.request.method} not allowed"})
        token = self.path_args[0]
        try:
            check_auth(self.service, self.request, needs_user=False)
            since = raw_query(self.request, "since", "0")
            if not INTEGER.match(since or ""):
                raise ValueError(since)
            self.sent_seq = int(since)  # the last seq the client has; nothing is sent before open()
        except ApiError as exc:
            return self.answer(exc.status, exc.body)
        except ValueError:
            return self.answer(400, {"error": "since must be an integer"})
        try:
            broker = self.service.broker
            sub = await self.service.submissions.get(token)
            self.live = await broker.has_log(token)
            if sub is not None and not self.live and not is_final(sub["status_id"]):
                await self.reopen_log(token, sub)
                self.live = True
            if self.live and self.sent_seq > await broker.last_seq(token):
                self.sent_seq = 0  # a seq from before the broker lost the story: it is numbered anew
        except Exception as exc:
            error = unavailable(exc)
            if error is None:
                raise
            for name, value in error.headers.items():
                self.set_header(name, value)
            return self.answer(error.status, error.body)
        if sub is None:
            return self.answer(404, {"error": "Not Found"})
        self.interactive = bool(sub.get("interactive"))  # all a socket keeps of the submission
        upgrade = self.request.headers.get("Upgrade", "").lower() == "websocket"
        connection = "upgrade" in [v.strip().lower() for v in self.request.headers.get("Connection", "").split(",")]
        if not (upgrade and connection):
            self.set_header("Upgrade", "websocket")
            return self.answer(426, {"error": "this route is a WebSocket: send an upgrade request"})
        self.token = token

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        if status_code == 405:
            self.set_header("Allow", "GET")
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps({"error": self._reason if status_code < 500 else "internal server error"}))

    def answer(self, status: int, body: Any = None) -> None:
        """A plain HTTP answer before the upgrade: JSON (or an empty body)."""
        self.set_status(status)
        if body is None:
            return self.finish()
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps(body))

    def get_compression_options(self) -> None:
        """No permessage-deflate: ``send_event`` writes one pre-built, uncompressed frame to every client."""
        return None

    def check_origin(self, origin: str) -> bool:
        if allowed_origin(self.service.settings.cors_origins, origin):
            return True
        return super().check_origin(origin)

    def open(self, token: str) -> None:
        self.inflight_since: float | None = None
        self.unread_replies = 0  # pongs and errors written and not yet flushed
        self.last_activity = self.last_heard = time.monotonic()
        self.send_now(events.message("connected", token, message=f"Connected to submission {token}"))
        self.service.sockets.add(self)
        if self.live:
            self.fanout = self.service.fanouts.follow(token, self)
        else:
            self.replayer = asyncio.create_task(self.replay_from_store())

    def send_now(self, message: dict[str, Any]) -> asyncio.Future | None:
        """A message of the socket's own (connected, pong, error), stamped with the last seq it was sent."""
        raw = json.dumps(message if "seq" in message else {**message, "seq": self.sent_seq})
        try:
            return self.write_message(raw)
        except websocket.WebSocketClosedError:
            return None

    def send_event(self, event: Any, now: bool) -> asyncio.Future | bool:
        """An event of the stream, as the frame built once for every client (``write_message`` would frame
        it again and start a task per message). With `now` and nothing else queued on the connection, the
        frame goes straight into the socket: True if it all went. Otherwise what is left goes through the
        connection's stream, and the future resolves once it is flushed. False: the socket is closed.
        Compression is never negotiated here (``get_compression_options`` returns None), so every client
        takes the same bytes."""
        self.last_activity = time.monotonic()
        conn = self.ws_connection
        if conn is None or conn.is_closing():
            return False
        stream, frame = conn.stream, event.frame
        try:
            if now and type(stream) is IOStream and not stream.writing():
                try:
                    written = stream.socket.send(frame)
                except OSError:  # full, or reset: the stream's own write waits, or meets the error and closes
                    written = 0
                if written == len(frame):
                    return True
                frame = memoryview(frame)[written:]
            return stream.write(frame)
        except StreamClosedError:
            return False

    def finished(self, code: int, reason: str) -> None:
        self.close(code, reason)

    def stalled(self, now: float) -> bool:
        """A message has been in flight for longer than ws_send_timeout: the client stopped reading."""
        return self.inflight_since is not None and now - self.inflight_since > self.service.settings.ws_send_timeout

    async def reopen_log(self, token: str, sub: dict[str, Any]) -> None:
        """An unfinished run with no event stream here (the broker lost it, or this is a fresh process):
        start its stream again with the stored status, so this socket follows it like any live run and the
        worker's next events arrive on it. If the run finished meanwhile, its final status closes it."""
        broker = self.service.broker
        await broker.publish(token, events.status_update(token, sub))
        now = await self.service.submissions.get(token)
        if now is not None and is_final(now["status_id"]):
            await broker.publish(token, events.status_update(token, now), final=True)

    async def replay_from_store(self) -> None:
        """A finished run whose event stream has expired: the stored final status, as the next seq."""
        try:
            sub = await self.service.submissions.get(self.token)
            if sub is not None:
                self.sent_seq += 1
                self.send_now({**events.status_update(self.token, sub), "seq": self.sent_seq})
            self.close(1000, "submission finished")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if unavailable(exc) is None:
                log.exception("replay from the store failed for %s", self.token)
            self.close(1013, "store unavailable; resume with ?since=%d" % self.sent_seq)

    def on_pong(self, data: bytes) -> None:
        self.last_heard = time.monotonic()

    def on_message(self, raw: str | bytes) -> None:
        self.last_activity = self.last_heard = time.monotonic()
        try:
            message = json.loads(raw)
            kind = message.get("type") if isinstance(message, dict) else None
        except ValueError:
            kind, message = None, None
        if kind == "ping":
            self.reply(events.message("pong", self.token))
        elif kind == "stdin" and isinstance(message, dict):
            inbox = self.inbox
            if inbox is None:
                inbox = self.inbox = StdinInbox()
                inbox.feeder = asyncio.create_task(self.feed_stdin_loop(inbox))
            size = len(raw)
            if inbox.queue.qsize() >= MAX_INBOX_MESSAGES or inbox.bytes + size > self.service.settings.max_stdin_size:
                self.close(1008, "too much stdin waiting to be delivered")
                return
            inbox.bytes += size
            inbox.queue.put_nowait((message, size))
        else:
            self.reply(events.message("error", self.token, error="unknown message",
                                      details='send {"type": "ping"} or {"type": "stdin", "data": "..."}'))

    def reply(self, message: dict[str, Any]) -> None:
        """A pong or an error, unless MAX_UNREAD_REPLIES are still unflushed: a client that sends without
        reading gets no more replies (they would pile up in the server's write buffer)."""
        if self.unread_replies >= MAX_UNREAD_REPLIES:
            return
        sent = self.send_now(message)
        if sent is not None:
            self.unread_replies += 1
            sent.add_done_callback(self._reply_flushed)

    def _reply_flushed(self, future: asyncio.Future) -> None:
        if not future.cancelled():
            future.exception()  # retrieved: a closed socket is on_close's business
        self.unread_replies -= 1

    async def feed_stdin_loop(self, inbox: StdinInbox) -> None:
        """The socket's one stdin consumer: hands each message to the broker in order, until on_close's None."""
        while True:
            item = await inbox.queue.get()
            if item is None:
                return
            message, size = item
            inbox.bytes -= size
            try:
                await self.feed_stdin(message, inbox)
            except Exception as exc:
                if unavailable(exc) is None:
                    log.exception("stdin for %s failed", self.token)
                self.send_now(events.message("error", self.token, error="stdin not accepted",
                                             details="the queue is unavailable; send it again shortly"))

    async def feed_stdin(self, message: dict[str, Any], inbox: StdinInbox) -> None:
        data, eof = message.get("data"), bool(message.get("eof"))
        if data is not None and not isinstance(data, str):
            self.send_now(events.message("error", self.token, error="bad stdin", details="data must be a string"))
            return
        if not self.interactive:
            self.send_now(events.message("error", self.token, error="not interactive",
                                         details="create the submission with \"interactive\": true"))
            return
        if not inbox.run_over:
            sub = await self.service.submissions.get(self.token)
            inbox.run_over = sub is None or is_final(sub["status_id"])
        if inbox.run_over:
            self.send_now(events.message("error", self.token, error="stdin not accepted",
                                         details="the program has finished"))
            return
        delivered = True
        if data:
            delivered = await self.service.broker.send_input(self.token, data)
        if eof:
            delivered = await self.service.broker.send_input(self.token, None) and delivered
        if not delivered:
            self.send_now(events.message("error", self.token, error="stdin not accepted",
                                         details="too much input is waiting for the program to read it"))

    def on_close(self) -> None:
        self.service.sockets.discard(self)
        if self.fanout is not None:
            self.fanout.discard(self)
        if self.replayer is not None:
            self.replayer.cancel()
        if self.inbox is not None:  # stdin already sent still reaches the program; then the feeder ends
            self.inbox.queue.put_nowait(None)


share_instance_keys(SubmissionSocket, TORNADO_ATTRIBUTES)
