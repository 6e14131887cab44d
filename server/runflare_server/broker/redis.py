"""The shared broker on Redis: every API and worker process of a cluster sees one queue, one event stream
per submission and one stdin per interactive run.

- Queue: the stream ``{prefix}:queue`` read by the consumer group ``workers``; each broker instance is one
  consumer. An entry stays pending while its worker runs it (a heartbeat keeps it fresh) and is deleted on
  ack, so the stream holds exactly the queued and the held jobs. A dead worker's entries go idle and are
  claimed again by another worker after ``visibility_timeout``.
- Events: the stream ``{prefix}:events:{token}`` whose entry ids are ``{seq}-0``; each entry holds the
  event's JSON (seq included), handed to every subscriber as is. One reader task per broker instance
  follows all the streams its local subscribers watch, so N subscribers of one token cost one read.
- Wake stream: ``{prefix}:wake:{consumer}``, read along with those streams. A stream joins the reader by an
  entry here (not a cancelled read), and a run announced with ``watch`` (a wait=true request) has its
  final event told here (``{prefix}:watcher:{token}`` names the stream), so its node reads one entry.
- Stdin: the list ``{prefix}:stdin:{token}``, its unread size capped cluster-wide by a counter.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .base import BrokerUnavailable, Event, Job
from .memory import LoggedEvent

log = logging.getLogger(__name__)

GROUP = "workers"
BLOCK = 1.0  # seconds a blocking read waits before looking around (cancellation, reclaim, new streams)
TIMEOUT = 2.0  # seconds a command may take before Redis counts as unreachable
LIVE_TTL = 86_400  # seconds an unfinished event log or stdin outlives its last write (a lost run)
BATCH = 1000
OPENED_KEPT = 256  # streams opened lately, what they hold kept for a subscriber (a client that opens the
# run's WebSocket right after creating it)
OPENED_FOR = 5.0  # seconds that is trusted: the stream surely exists (it outlives a run by `retention`)
WAKE_KEPT = 10_000  # entries a wake stream keeps (about: MAXLEN ~), more than a reader lets pile up
RESULT_TOLD_MAX = 16_384  # characters of a stored submission's JSON its final publish tells its waiting node
# (a larger one is read from the store)
TRIM_WAKE_AFTER = 32  # results read from the wake stream before its node trims what it has read (so the
# stream holds at most about this many results, and the trim, one command, is off most answers' path)
WATCHED_KEPT = 10_000  # runs a node waits for the end of (wait=true); the oldest are let go past that
STALE_CHECKS = 4  # looks for a dead worker's jobs per visibility timeout (at most one per BLOCK)
CATALOG_TTL = 86_400  # seconds the workers' language catalog lasts without a worker saying it again

# KEYS: events stream, seq counter, queue, watcher. ARGV: final flag (for the last event), maxlen, ttl ms final,
# live ttl ms, token, queue it after the events ('1' or ''), a wake stream to tell of its final event ('' for
# none), the stored submission's JSON to tell with it ('' for none), then each event's JSON without seq. One
# round trip for a run's opening (its events, its queue entry, who waits for its end) or its closing events.
# The final event is told to the wake stream its watcher named (the API node of a wait=true request), so that
# node needs not read every event of the run, nor the store when the result comes along. The watcher's
# stream is made by the announce, and never made again by a final (its node may have closed and deleted it).
PUBLISH = """
local seq = redis.call('INCR', KEYS[2])
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if last[1] then
  local previous = tonumber(string.match(last[1][1], '^(%d+)'))
  if previous >= seq then seq = previous + 1 end
end
local count = #ARGV - 8
local final = ARGV[1] == '1'
local raws = {}
for i = 1, count do
  local body = ARGV[8 + i]
  local sep = ', '
  if body == '{}' then sep = '' end
  local raw = string.sub(body, 1, -2) .. sep .. '"seq": ' .. seq .. '}'
  if final and i == count then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], seq .. '-0', 'e', raw, 'f', '1')
  else
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], seq .. '-0', 'e', raw)
  end
  raws[i] = raw
  seq = seq + 1
end
redis.call('SET', KEYS[2], seq - 1)
local ttl = ARGV[4]
if final then ttl = ARGV[3] end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
if ARGV[7] ~= '' then
  redis.call('SET', KEYS[4], ARGV[7], 'PX', ARGV[4])
  if redis.call('EXISTS', ARGV[7]) == 0 then redis.call('XADD', ARGV[7], '*', 'w', '1') end
  redis.call('PEXPIRE', ARGV[7], ARGV[4])
end
if ARGV[6] == '1' then redis.call('XADD', KEYS[3], '*', 'token', ARGV[5]) end
if final then
  local watcher = redis.call('GET', KEYS[4])
  if watcher then
    redis.call('DEL', KEYS[4])
    if ARGV[8] ~= '' then
      redis.call('XADD', watcher, 'NOMKSTREAM', 'MAXLEN', '~', WAKE_KEPT, '*', 'final', ARGV[5], 'result', ARGV[8])
    else
      redis.call('XADD', watcher, 'NOMKSTREAM', 'MAXLEN', '~', WAKE_KEPT, '*', 'final', ARGV[5])
    end
    redis.call('PEXPIRE', watcher, ARGV[4])
  end
end
return raws
""".replace("WAKE_KEPT", str(WAKE_KEPT))

# KEYS: queue. ARGV: group, consumer, min idle ms. Claims the oldest entry idle that long (its worker
# died): {id, fields, deliveries} or false. XPENDING IDLE scans the whole pending list in one call
# (XAUTOCLAIM looks at ten entries per call and needs a cursor walk); XCLAIM counts the delivery.
RECLAIM = """
for _ = 1, 10 do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], '-', '+', 1)
  if not p[1] then return false end
  local id = p[1][1]
  local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], id)
  if claimed[1] then
    local info = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
    return {id, claimed[1][2], info[1][4]}
  end
end
return false
"""

# KEYS: queue. ARGV: group, consumer, ids. Resets the idle time of the ids this consumer still holds
# (JUSTID: the delivery count stays); an id another consumer took is left alone.
HEARTBEAT = """
local mine = {}
for i = 3, #ARGV do
  local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if type(p) == 'table' and p[1] then table.insert(mine, ARGV[i]) end
end
local count = #mine
if count > 0 then
  table.insert(mine, 'JUSTID')
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(mine))
end
return count
"""

# KEYS: queue. ARGV: group. Entries not yet delivered = all entries - pending (acked ones are deleted).
DEPTH = """
local n = redis.call('XLEN', KEYS[1])
local p = redis.pcall('XPENDING', KEYS[1], ARGV[1])
if type(p) == 'table' and p[1] then return n - p[1] end
return n
"""

# KEYS: stdin list, pending counter. ARGV: item, its length, cap, ttl ms. 0 when over the cap.
SEND_INPUT = """
local size = tonumber(ARGV[2])
local pending = tonumber(redis.call('GET', KEYS[2]) or '0')
if pending + size > tonumber(ARGV[3]) then return 0 end
redis.call('INCRBY', KEYS[2], size)
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"""


def told_result(result: dict[str, Any] | None) -> str:
    """The stored submission as its final publish tells it, or "" when there is none or it is too large
    (its text fields alone are measured first, so a large result is never encoded for nothing)."""
    if result is None or sum(len(v) for v in result.values() if isinstance(v, str)) > RESULT_TOLD_MAX:
        return ""
    told = json.dumps(result)
    return told if len(told) <= RESULT_TOLD_MAX else ""


def item_cost(chunk: str | None) -> int:
    """What a stdin item counts against the pending cap: its length, and at least 1, so that a flood of
    empty chunks or end-of-input markers is capped too."""
    return max(1, len(chunk or ""))


class StoredEvent(LoggedEvent):
    """An event read back from Redis: its stored JSON is its `raw`, byte for byte."""

    __slots__ = ()

    def __init__(self, raw: str):
        dict.__init__(self, json.loads(raw))
        self.raw = raw
        self._frame = None


@contextlib.contextmanager
def unavailable() -> Iterator[None]:
    """Turn Redis's connection failures into BrokerUnavailable."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError) as exc:
        raise BrokerUnavailable(f"redis: {exc}") from exc


def is_nogroup(exc: ResponseError) -> bool:
    return str(exc).startswith("NOGROUP")


class Follow:
    """One token's events as this process knows them, shared by all its local subscribers."""

    def __init__(self, token: str, keep: int) -> None:
        self.token = token
        self.keep = keep
        self.events: list[StoredEvent] = []
        self.seqs: list[int] = []
        self.base = 0  # absolute index of events[0] (older ones were dropped to bound memory)
        self.last_id = "0-0"
        self.final = False
        self.failed: BrokerUnavailable | None = None
        self.refs = 0
        self.loaded: asyncio.Future[None] | None = None
        self.ready = False  # the stream so far is read: the shared reader goes on from last_id
        self._changed = asyncio.Event()

    @property
    def live(self) -> bool:
        return self.ready and bool(self.events) and not self.final and self.failed is None

    def extend(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        for entry_id, fields in entries:
            seq = int(entry_id.split("-", 1)[0])
            if self.seqs and seq <= self.seqs[-1]:
                continue
            self.events.append(StoredEvent(fields["e"]))
            self.seqs.append(seq)
            self.last_id = entry_id
            self.final = fields.get("f") == "1"
        if len(self.events) > self.keep:
            drop = len(self.events) - self.keep
            del self.events[:drop], self.seqs[:drop]
            self.base += drop
        self.notify()

    def fail(self, exc: BrokerUnavailable) -> None:
        self.failed = exc
        self.notify()

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def start(self, since: int) -> int:
        """The absolute index of the first event with seq > since."""
        return self.base + bisect.bisect_right(self.seqs, since)

    async def changed(self) -> None:
        await self._changed.wait()


class RedisInputChannel:
    """The stdin of one interactive run, read by its worker (BLPOP, any node may send)."""

    def __init__(self, broker: RedisBroker, token: str) -> None:
        self._broker = broker
        self._list = broker._key("stdin", token)
        self._pending = broker._key("stdin-pending", token)

    async def get(self) -> str | None:
        """The next chunk sent (waiting for one); None at end of input."""
        client = self._broker._blocking
        while True:
            with unavailable():
                popped = await client.blpop([self._list], timeout=BLOCK)
            if popped is None:
                continue
            item = popped[1]
            chunk = None if item.startswith("e") else item[1:]
            with unavailable():
                await self._broker._redis.decrby(self._pending, item_cost(chunk))
            return chunk

    async def close(self) -> None:
        """Forget what nobody will read."""
        with unavailable():
            await self._broker._redis.delete(self._list, self._pending)


class RedisBroker:
    """The broker shared by all processes of a cluster through one Redis (keys under `prefix`)."""

    kind = "redis"

    def __init__(self, url: str, prefix: str = "runflare", visibility_timeout: float = 30.0,
                 retention: float = 600.0, max_events: int = 10_000, max_pending_input: int = 1 << 20):
        self.url = url
        self.prefix = prefix
        self.visibility_timeout = visibility_timeout
        self.retention = retention
        self.max_events = max_events
        self.max_pending_input = max_pending_input
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._queue = self._key("queue")
        options: dict[str, Any] = {
            "decode_responses": True, "socket_connect_timeout": TIMEOUT,
            "client_name": f"{prefix}:{self.consumer}",  # CLIENT LIST tells which process holds what
            "retry": Retry(NoBackoff(), 1, (RedisConnectionError,)),  # once: a pooled socket Redis dropped
        }
        self._redis = aioredis.from_url(url, socket_timeout=TIMEOUT, **options)
        # Blocking reads (dequeue, stdin, the event reader) wait up to BLOCK on their own sockets.
        self._blocking = aioredis.from_url(url, socket_timeout=BLOCK + TIMEOUT, **options)
        self._publish = self._redis.register_script(PUBLISH)
        self._reclaim = self._redis.register_script(RECLAIM)
        self._heartbeat_script = self._redis.register_script(HEARTBEAT)
        self._depth = self._redis.register_script(DEPTH)
        self._send_input = self._redis.register_script(SEND_INPUT)
        self._next_stale_check = 0.0  # monotonic time of the next look for jobs of dead workers
        # Streams this instance opened lately (announce): a subscriber right after needs no XRANGE.
        self._opened: OrderedDict[str, tuple[float, list[tuple[str, dict[str, str]]]]] = OrderedDict()
        self._held: dict[str, str] = {}  # entry id -> token, taken by this instance, not yet acked
        self._follows: dict[str, Follow] = {}
        self._wake = asyncio.Event()  # the set of followed streams grew
        # The reader's XREAD also follows this stream of its own: an entry added to it ends the read, so
        # a stream joins without cancelling the read (redis-py drops the socket of a cancelled one).
        self._wake_key = self._key("wake", self.consumer)
        self._wake_last = "0-0"
        self._results_untrimmed = 0  # results read from the wake stream since it was last trimmed
        self._reading = False  # the reader's XREAD is out: a new stream needs a nudge through Redis
        self._nudged = False  # ... and has had one
        self._background: set[asyncio.Task] = set()  # nudges and trims of the wake stream, not awaited
        # Runs this node announced with watch=True: (True, the stored submission or None) once their final
        # event is told on the wake stream, (False, None) when let go otherwise (the waiter then follows the
        # run's stream itself).
        self._watched: dict[str, asyncio.Future[tuple[bool, dict[str, Any] | None]]] = {}
        self._watching: set[str] = set()  # of those, the ones whose watcher key is in Redis (announced)
        self._next_watch_check = 0.0
        self._closed = False
        self._tasks: list[asyncio.Task] = []
        self._reader: asyncio.Task | None = None

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # lifecycle

    async def open(self) -> None:
        """Create the consumer group and start the heartbeat; BrokerUnavailable if Redis is down (the
        broker still works once it is back)."""
        self._closed = False
        if not self._tasks:
            self._tasks.append(asyncio.create_task(self._heartbeat_loop()))
        with unavailable():
            await self._ensure_group()

    async def close(self) -> None:
        """Stop the background tasks (held jobs are no longer kept alive) and close the connections."""
        self._closed = True
        tasks = [*self._tasks, *self._background, *([self._reader] if self._reader else [])]
        self._tasks, self._reader = [], None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._fail(list(self._follows.values()), BrokerUnavailable("broker closed"))
        self._release_watched(list(self._watched), told=False)
        if not self._held:
            with contextlib.suppress(RedisError, OSError):
                pending = await self._redis.xpending_range(self._queue, GROUP, "-", "+", 1, self.consumer)
                if not pending:
                    await self._redis.xgroup_delconsumer(self._queue, GROUP, self.consumer)
        self._held.clear()
        with contextlib.suppress(RedisError, OSError):
            await self._redis.delete(self._wake_key)
        await self._redis.aclose()
        await self._blocking.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    async def _ensure_group(self) -> None:
        try:
            await self._redis.xgroup_create(self._queue, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # queue

    async def enqueue(self, token: str) -> None:
        with unavailable():
            await self._redis.xadd(self._queue, {"token": token})

    async def dequeue(self) -> Job:
        """The next job: one a dead worker left (idle past the visibility timeout), else a new one."""
        while True:
            with unavailable():
                try:
                    job = await self._take_stale() or await self._take_new()
                except ResponseError as exc:
                    if not is_nogroup(exc):
                        raise
                    await self._ensure_group()  # Redis lost its data (a restart)
                    continue
            if job is not None:
                self._held[job.receipt] = job.token
                return job

    async def _take_stale(self) -> Job | None:
        """A job a dead worker left. Looked for at most every STALE_CHECKS-th of the visibility timeout
        (capped at BLOCK) while none is found, not before every job: an entry goes stale only after a
        whole timeout, so this delays its reclaim by a fraction of one and saves a round trip a run."""
        now = time.monotonic()
        if now < self._next_stale_check:
            return None
        idle = max(1, int(self.visibility_timeout * 1000))
        found = await self._reclaim(keys=[self._queue], args=[GROUP, self.consumer, idle])
        if not found:
            self._next_stale_check = now + min(BLOCK, self.visibility_timeout / STALE_CHECKS)
            return None
        entry_id, fields, deliveries = found
        token = dict(zip(fields[::2], fields[1::2], strict=True))["token"]
        return Job(token, int(deliveries), entry_id)

    async def _take_new(self) -> Job | None:
        read = await self._blocking.xreadgroup(GROUP, self.consumer, {self._queue: ">"}, count=1,
                                               block=int(BLOCK * 1000))
        for _stream, entries in read or []:
            for entry_id, fields in entries:
                return Job(fields["token"], 1, entry_id)
        return None

    async def ack(self, job: Job) -> None:
        """The job is done: forget its entry and stop keeping it alive (kept alive until this succeeds:
        retry on BrokerUnavailable)."""
        with unavailable():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xack(self._queue, GROUP, job.receipt)
                pipe.xdel(self._queue, job.receipt)
                await pipe.execute()
        self._held.pop(job.receipt, None)

    async def depth(self) -> int:
        with unavailable():
            return int(await self._depth(keys=[self._queue], args=[GROUP]))

    async def tracked(self) -> set[str]:
        """Tokens queued or held by any worker of the cluster."""
        tokens: set[str] = set()
        start = "-"
        with unavailable():
            while True:
                entries = await self._redis.xrange(self._queue, start, "+", count=BATCH)
                tokens.update(fields["token"] for _id, fields in entries)
                if len(entries) < BATCH:
                    break
                start = "(" + entries[-1][0]
            async for key in self._redis.scan_iter(match=self._key("held", "*"), count=BATCH):
                tokens.update(json.loads(await self._redis.get(key) or "[]"))
            return tokens

    async def try_lock(self, name: str, ttl: float) -> bool:
        """Whether this instance got the cluster-wide lock `name` for `ttl` seconds."""
        with unavailable():
            return bool(await self._redis.set(self._key("lock", name), self.consumer, nx=True,
                                              px=max(1, int(ttl * 1000))))

    async def set_catalog(self, catalog: dict[str, Any]) -> None:
        """Kept for CATALOG_TTL; workers say it again at start and every reconcile interval."""
        with unavailable():
            await self._redis.set(self._key("catalog"), json.dumps(catalog), ex=CATALOG_TTL)

    async def catalog(self) -> dict[str, Any] | None:
        with unavailable():
            raw = await self._redis.get(self._key("catalog"))
        return json.loads(raw) if raw else None

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.visibility_timeout / 3)
            if not self._held:
                continue
            try:
                await self._heartbeat_script(keys=[self._queue], args=[GROUP, self.consumer, *self._held])
                # What this worker runs, kept apart from the stream: a Redis that lost its data gets it back
                # within a beat, so the reconciler does not queue a running submission again.
                await self._redis.set(self._key("held", self.consumer), json.dumps(sorted(self._held.values())),
                                      px=max(1, int(self.visibility_timeout * 1000)))
            except (RedisError, OSError) as exc:
                log.warning("heartbeat of held jobs failed: %s", exc)

    # events

    async def publish(self, token: str, event: Event, final: bool = False) -> Event:
        (published,) = await self._publish_all(token, [event], final)
        return published

    async def publish_many(self, token: str, events: list[Event], final: bool = False,
                           result: dict[str, Any] | None = None) -> list[Event]:
        return await self._publish_all(token, events, final, result=told_result(result) if final else "")

    async def announce(self, token: str, events: list[Event], watch: bool = False) -> list[Event]:
        if watch:
            self._watch(token)
        try:
            published = await self._publish_all(token, events, False, queue=True, watch=watch)
        except BaseException:
            self._release_watched([token], told=False)
            raise
        if watch and token in self._watched:
            self._watching.add(token)
        if published and published[0]["seq"] == 1:  # a new stream: its whole content so far
            self._opened[token] = (time.monotonic(), [(f"{e['seq']}-0", {"e": e.raw}) for e in published])
            while len(self._opened) > OPENED_KEPT:
                self._opened.popitem(last=False)
        return published

    async def _publish_all(self, token: str, events: list[Event], final: bool, queue: bool = False,
                           watch: bool = False, result: str = "") -> list[Event]:
        if not events:
            return []
        bodies = [json.dumps({k: v for k, v in event.items() if k != "seq"}) for event in events]
        args = ["1" if final else "0", self.max_events, max(1, int(self.retention * 1000)), LIVE_TTL * 1000,
                token, "1" if queue else "", self._wake_key if watch else "", result, *bodies]
        keys = [self._key("events", token), self._key("seq", token), self._queue, self._key("watcher", token)]
        with unavailable():
            raws = await self._publish(keys=keys, args=args)
        return [StoredEvent(raw) for raw in raws]

    async def has_log(self, token: str) -> bool:
        with unavailable():
            return bool(await self._redis.exists(self._key("events", token)))

    async def last_seq(self, token: str) -> int:
        with unavailable():
            return int(await self._redis.get(self._key("seq", token)) or 0)

    async def subscribe(self, token: str, since: int = 0) -> AsyncIterator[Event]:
        """Events with seq > since: replayed from this process's copy, then live from the shared reader."""
        follow = await self._follow(token)
        try:
            cursor = follow.start(since)
            while True:
                while cursor < follow.base + len(follow.events):
                    index = max(cursor, follow.base)
                    cursor = index + 1
                    if follow.seqs[index - follow.base] > since:  # since may be ahead of what was read
                        yield follow.events[index - follow.base]
                if follow.final:
                    return
                if follow.failed is not None:
                    raise follow.failed
                if not follow.events:
                    return  # no such log
                await follow.changed()
        finally:
            self._unfollow(follow)

    async def _follow(self, token: str) -> Follow:
        follow = self._follows.get(token)
        if follow is None:
            follow = self._follows[token] = Follow(token, self.max_events)
            follow.loaded = asyncio.ensure_future(self._load(follow))
            follow.loaded.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved
        follow.refs += 1
        try:
            await asyncio.shield(follow.loaded)
        except BaseException:
            self._unfollow(follow)
            raise
        return follow

    def _unfollow(self, follow: Follow) -> None:
        follow.refs -= 1
        if follow.refs <= 0 and self._follows.get(follow.token) is follow:
            del self._follows[follow.token]

    async def _load(self, follow: Follow) -> None:
        """Read the stream so far; the reader follows it from there on."""
        key = self._key("events", follow.token)
        start = "-"
        opened_at, opened = self._opened.pop(follow.token, (0.0, []))
        fresh = bool(opened) and time.monotonic() - opened_at < OPENED_FOR
        try:
            with unavailable():
                if fresh:  # a stream this process has just opened: the reader reads what came after
                    follow.extend(opened)
                while not fresh:
                    entries = await self._redis.xrange(key, start, "+", count=BATCH)
                    follow.extend(entries)
                    if len(entries) < BATCH:
                        break
                    start = "(" + entries[-1][0]
        except BaseException:
            if self._follows.get(follow.token) is follow:
                del self._follows[follow.token]
            raise
        follow.ready = True
        if follow.events and not follow.final:
            self._wake_reader()
            self._start_reader()

    def _wake_reader(self) -> None:
        """Have the reader start again with the streams followed now."""
        self._wake.set()
        if self._reading and not self._nudged:
            self._nudged = True
            self._in_background(self._nudge())

    def _watch(self, token: str) -> None:
        self._watched[token] = asyncio.get_running_loop().create_future()
        while len(self._watched) > WATCHED_KEPT:  # the oldest waiter follows its run's stream instead
            self._release_watched([next(iter(self._watched))], told=False)
        self._wake.set()  # an idle reader reads its wake stream from now on (a busy one already does)
        self._start_reader()

    def _start_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_loop())

    def _release_watched(self, tokens: Iterable[str], told: bool,
                         results: dict[str, dict[str, Any]] | None = None) -> None:
        for token in tokens:
            waiter = self._watched.pop(token, None)
            self._watching.discard(token)
            if waiter is not None and not waiter.done():
                waiter.set_result((told, results.get(token) if results else None))

    async def wait_final(self, token: str) -> dict[str, Any] | None:
        """Return once the run's final event is published (or this node can no longer tell: the caller
        reads the store then). A run this node announced with watch=True is told by its final publish,
        through this node's wake stream, with the stored submission when it was small enough to come
        along (returned); any other is followed event by event."""
        waiter = self._watched.get(token)
        if waiter is not None:
            try:
                told, result = await asyncio.shield(waiter)
                if told:
                    return result
            finally:
                self._release_watched([token], told=False)
        if self._closed:
            return None
        async for _event in self.subscribe(token):  # it ends after the final event
            pass
        return None

    def _in_background(self, work: Any) -> None:
        """Run `work` without waiting for it; `close` cancels it if it is still out."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _trim_wake(self, read_to: str) -> None:
        """Drop the wake stream's entries before `read_to`."""
        try:
            await self._redis.xtrim(self._wake_key, minid=read_to, approximate=False)
        except (RedisError, OSError) as exc:  # MAXLEN ~ WAKE_KEPT still bounds it
            log.debug("could not trim the wake stream: %s", exc)

    async def _nudge(self) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wake_key, {"w": "1"}, maxlen=WAKE_KEPT, approximate=True)
                pipe.pexpire(self._wake_key, LIVE_TTL * 1000)
                await pipe.execute()
        except (RedisError, OSError) as exc:  # the reader looks around again within BLOCK anyway
            log.debug("could not wake the event reader: %s", exc)

    async def _read_loop(self) -> None:
        """The one blocking reader of this process: XREAD over every live followed stream, restarted when
        a stream is added."""
        while True:
            self._wake.clear()
            live = {self._key("events", t): f for t, f in self._follows.items() if f.live}
            if not live and not self._watched:
                await self._wake.wait()
                continue
            try:
                await self._read_once(live)
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                log.warning("event reader: %s", exc)
                self._fail(live.values(), BrokerUnavailable(f"redis: {exc}"))
                self._release_watched(list(self._watched), told=False)
                await asyncio.sleep(BLOCK / 2)
            except Exception as exc:
                log.exception("event reader failed")
                self._fail(live.values(), BrokerUnavailable(f"event reader: {exc!r}"))
                self._release_watched(list(self._watched), told=False)
                await asyncio.sleep(BLOCK / 2)

    async def _read_once(self, live: dict[str, Follow]) -> None:
        """One XREAD of the live streams and the wake stream (nothing is consumed: a read that ends early
        for a new stream loses nothing)."""
        streams = {k: f.last_id for k, f in live.items()}
        streams[self._wake_key] = self._wake_last
        self._reading, self._nudged = True, False
        try:
            result = await self._blocking.xread(streams, count=BATCH, block=int(BLOCK * 1000))
        finally:
            self._reading = False
        if not result:
            await self._drop_lost(live)
        for key, entries in result or []:
            if key == self._wake_key:
                self._wake_last = entries[-1][0]
                finals = [fields for _id, fields in entries if "final" in fields]
                results = {f["final"]: json.loads(f["result"]) for f in finals if "result" in f}
                self._release_watched([f["final"] for f in finals], told=True, results=results)
                self._results_untrimmed += len(results)
                if self._results_untrimmed >= TRIM_WAKE_AFTER:  # results are what make a wake stream large
                    self._results_untrimmed = 0
                    self._in_background(self._trim_wake(self._wake_last))
            else:
                live[key].extend(entries)
        if self._watching and time.monotonic() >= self._next_watch_check:
            await self._check_watchers()

    async def _drop_lost(self, live: dict[str, Follow]) -> None:
        """In a quiet moment: fail the followers of live streams that vanished (Redis lost its data; a
        re-run would start again at seq 1, below where they wait)."""
        exists = await self._exist(list(live))
        lost = [follow for follow, found in zip(live.values(), exists, strict=True) if not found]
        self._fail(lost, BrokerUnavailable("the event stream was lost (Redis restarted?)"))

    async def _check_watchers(self) -> None:
        """Every BLOCK, busy or not: a watcher key gone without news (Redis lost it, or the news is on its
        way) lets its waiter go; it follows the run's stream instead, which tells either way."""
        self._next_watch_check = time.monotonic() + BLOCK
        watching = list(self._watching)
        exists = await self._exist([self._key("watcher", token) for token in watching])
        self._release_watched([t for t, found in zip(watching, exists, strict=True) if not found], told=False)

    async def _exist(self, keys: list[str]) -> list[bool]:
        """Whether each key exists, in one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.exists(key)
            return [bool(found) for found in await pipe.execute()]

    def _fail(self, follows: Iterable[Follow], exc: BrokerUnavailable) -> None:
        for follow in follows:
            follow.fail(exc)
            if self._follows.get(follow.token) is follow:
                del self._follows[follow.token]

    # stdin

    async def send_input(self, token: str, chunk: str | None) -> bool:
        item = "e" if chunk is None else "d" + chunk
        keys = [self._key("stdin", token), self._key("stdin-pending", token)]
        args = [item, item_cost(chunk), self.max_pending_input, LIVE_TTL * 1000]
        with unavailable():
            return bool(await self._send_input(keys=keys, args=args))

    async def open_input(self, token: str) -> RedisInputChannel:
        return RedisInputChannel(self, token)
