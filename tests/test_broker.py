"""The broker contract on both backends (in-process and the real Redis at 127.0.0.1:6379), and what only
the shared broker does: two RedisBroker instances on one prefix stand for two processes of a cluster."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from conftest import skip_or_fail

from runflare_server.broker import MemoryBroker
from runflare_server.broker.base import BrokerUnavailable

REDIS_URL = "redis://127.0.0.1:6379/0"
BOUND = 30  # seconds a broken broker may hang a test before it fails (never a measurement)


class Backend:
    """Makes brokers of one kind; for Redis they share a prefix unique to the test."""

    def __init__(self, kind: str, prefix: str) -> None:
        self.kind = kind
        self.prefix = prefix

    def make(self, **options: Any) -> Any:
        if self.kind == "memory":
            return MemoryBroker(**options)
        from runflare_server.broker.redis import RedisBroker

        return RedisBroker(REDIS_URL, prefix=self.prefix, **options)

    @asynccontextmanager
    async def broker(self, **options: Any) -> AsyncIterator[Any]:
        broker = self.make(**options)
        await broker.open()
        try:
            yield broker
        finally:
            await broker.close()


def redis_client() -> Any:
    try:
        import redis
    except ImportError:
        skip_or_fail("the redis package is not installed (pip install runflare[scale])")
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        skip_or_fail(f"no Redis at {REDIS_URL}: {exc}")
    return client


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    client = redis_client()
    prefix = f"test-broker-{secrets.token_hex(6)}"
    yield prefix
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    client.close()


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "memory":
        yield Backend("memory", "")
    else:
        yield Backend("redis", request.getfixturevalue("redis_prefix"))


@pytest.fixture
def shared(redis_prefix: str) -> Backend:
    return Backend("redis", redis_prefix)


async def bounded(awaitable: Any) -> Any:
    return await asyncio.wait_for(awaitable, BOUND)


async def collect(broker: Any, token: str, since: int = 0) -> list[dict]:
    return [event async for event in broker.subscribe(token, since)]


async def started(task: asyncio.Task, got: list, count: int) -> None:
    """Wait until a subscriber task has received `count` events."""
    while len(got) < count:
        assert not task.done(), task
        await asyncio.sleep(0.01)


# The contract, on both backends


async def test_queue_is_fifo_and_depth_counts_waiting_jobs(backend: Backend):
    async with backend.broker() as broker:
        assert await broker.depth() == 0
        for token in ("a", "b", "c"):
            await broker.enqueue(token)
        assert await broker.depth() == 3
        first = await bounded(broker.dequeue())
        assert (first.token, first.attempt) == ("a", 1)
        assert await broker.depth() == 2
        jobs = [first, await bounded(broker.dequeue()), await bounded(broker.dequeue())]
        assert [j.token for j in jobs] == ["a", "b", "c"]
        assert await broker.depth() == 0
        for job in jobs:
            await broker.ack(job)
        assert await broker.depth() == 0


async def test_dequeue_waits_for_an_enqueue(backend: Backend):
    async with backend.broker() as broker:
        waiting = asyncio.ensure_future(broker.dequeue())
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await broker.enqueue("late")
        job = await bounded(waiting)
        assert job.token == "late"
        await broker.ack(job)


async def test_dequeue_can_be_cancelled(backend: Backend):
    async with backend.broker() as broker:
        waiting = asyncio.ensure_future(broker.dequeue())
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await bounded(waiting)
        await broker.enqueue("next")
        job = await bounded(broker.dequeue())
        assert job.token == "next"


async def test_tracked_is_queued_and_held_jobs(backend: Backend):
    async with backend.broker() as broker:
        assert await broker.tracked() == set()
        await broker.enqueue("a")
        await broker.enqueue("b")
        job = await bounded(broker.dequeue())
        assert await broker.tracked() == {"a", "b"}
        await broker.ack(job)
        assert await broker.tracked() == {"b"}
        await broker.ack(await bounded(broker.dequeue()))
        assert await broker.tracked() == set()
        assert await broker.try_lock("reconcile", 5.0)


async def test_publish_stamps_seq_and_encodes_once(backend: Backend):
    async with backend.broker() as broker:
        assert not await broker.has_log("t")
        assert await broker.last_seq("t") == 0
        stamped = [await broker.publish("t", {"type": "status", "n": n, "text": "é\n"}) for n in range(3)]
        assert [e["seq"] for e in stamped] == [1, 2, 3]
        for n, event in enumerate(stamped):
            assert event == {"type": "status", "n": n, "text": "é\n", "seq": n + 1}
            assert json.loads(event.raw) == event
        assert await broker.has_log("t")
        assert await broker.last_seq("t") == 3
        assert not await broker.has_log("other")


async def test_subscribe_replays_from_since_then_follows_live_and_ends_after_final(backend: Backend):
    async with backend.broker() as broker:
        for n in (1, 2):
            await broker.publish("t", {"n": n})
        got: list[dict] = []

        async def follow() -> None:
            async for event in broker.subscribe("t", since=1):
                got.append(event)

        task = asyncio.ensure_future(follow())
        await bounded(started(task, got, 1))
        await broker.publish("t", {"n": 3})
        await broker.publish("t", {"n": 4}, final=True)
        await bounded(task)
        assert [(e["seq"], e["n"]) for e in got] == [(2, 2), (3, 3), (4, 4)]
        assert [e.raw for e in got] == [json.dumps(e) for e in got]
        # a finished log replays and ends at once
        assert [e["seq"] for e in await bounded(collect(broker, "t"))] == [1, 2, 3, 4]
        assert await bounded(collect(broker, "t", since=4)) == []
        assert await bounded(collect(broker, "missing")) == []


async def test_many_subscribers_of_one_run_each_get_every_event_in_order(backend: Backend):
    async with backend.broker() as broker:
        await broker.publish("t", {"n": 0})
        tasks = [asyncio.ensure_future(collect(broker, "t", since=i % 3)) for i in range(100)]
        await asyncio.sleep(0.05)
        for n in range(1, 30):
            await broker.publish("t", {"n": n})
            if n % 7 == 0:
                await asyncio.sleep(0.01)
        await broker.publish("t", {"n": 30}, final=True)
        results = await bounded(asyncio.gather(*tasks))
        for i, events in enumerate(results):
            assert [e["seq"] for e in events] == list(range(i % 3 + 1, 32))
            assert [e["n"] for e in events] == list(range(i % 3, 31))
        assert len({e.raw for events in results for e in events}) == 31  # one text per event


async def test_announce_opens_the_log_then_queues_and_publish_many_ends_it(backend: Backend):
    async with backend.broker() as broker:
        opened = await broker.announce("t", [{"status": "in queue"}, {"stage": "queued"}])
        assert [(e["seq"], e.raw) for e in opened] == [(1, '{"status": "in queue", "seq": 1}'),
                                                       (2, '{"stage": "queued", "seq": 2}')]
        job = await bounded(broker.dequeue())
        assert job.token == "t" and await broker.last_seq("t") == 2
        following = asyncio.ensure_future(collect(broker, "t"))
        await asyncio.sleep(0.05)
        assert not following.done()
        closing = await broker.publish_many("t", [{"stage": "finished"}, {"status": "accepted"}], final=True)
        assert [e["seq"] for e in closing] == [3, 4]
        got = await bounded(following)
        assert [e["seq"] for e in got] == [1, 2, 3, 4] and got[-1]["status"] == "accepted"
        assert [e.raw for e in got] == [e.raw for e in opened + closing]  # one text per event, as stored
        await broker.ack(job)
        assert await broker.depth() == 0


async def test_a_reopened_log_continues_its_seq(backend: Backend):
    async with backend.broker() as broker:
        await broker.publish("t", {"status": "queued"})
        await broker.publish("t", {"status": "finished"}, final=True)
        assert (await broker.publish("t", {"status": "queued again"}))["seq"] == 3
        assert await broker.last_seq("t") == 3
        following = asyncio.ensure_future(collect(broker, "t", since=2))
        await asyncio.sleep(0.05)
        assert not following.done()  # the log is live again
        await broker.publish("t", {"status": "finished again"}, final=True)
        assert [e["seq"] for e in await bounded(following)] == [3, 4]


async def test_memory_logs_are_evicted_oldest_finished_first_past_retention_or_the_budget():
    broker = MemoryBroker(retention=0.3, max_logs=3)
    for token in "abc":
        await broker.publish(token, {"status": "queued"})
        await broker.publish(token, {"status": "finished"}, final=True)
    await broker.publish("d", {"status": "queued"})  # a fourth log: the budget drops the oldest finished one
    assert [await broker.has_log(t) for t in "abcd"] == [False, True, True, True]
    await asyncio.sleep(0.4)
    await broker.publish("e", {"status": "finished"}, final=True)  # b and c expired meanwhile; d still runs
    assert [await broker.has_log(t) for t in "bcde"] == [False, False, True, True]


async def test_a_memory_log_reopened_is_kept_while_it_runs_again_and_expires_from_its_last_close():
    broker = MemoryBroker(retention=0.3)
    await broker.publish("r", {"status": "finished"}, final=True)
    await broker.publish("r", {"status": "queued again"})
    await asyncio.sleep(0.4)
    await broker.publish("x", {"status": "finished"}, final=True)
    assert await broker.has_log("r")  # running again: never evicted
    await broker.publish("r", {"status": "finished again"}, final=True)
    await asyncio.sleep(0.2)
    await broker.publish("y", {"status": "finished"}, final=True)
    assert await broker.has_log("r")  # its retention counts from its last close, not its first
    await asyncio.sleep(0.2)
    await broker.publish("z", {"status": "finished"}, final=True)
    assert not await broker.has_log("r") and await broker.has_log("z")


async def test_stdin_in_order_with_eof_and_a_cap_on_unread_input(backend: Backend):
    async with backend.broker(max_pending_input=11) as broker:
        assert await broker.send_input("t", "abc")  # sent before the run opens it: it waits
        assert await broker.send_input("t", "defg")
        assert not await broker.send_input("t", "12345")  # 7 unread + 5 > 11
        channel = await broker.open_input("t")
        assert await bounded(channel.get()) == "abc"
        assert await broker.send_input("t", "12345")  # 4 + 5
        assert await broker.send_input("t", "")  # an empty chunk and the end count 1 each
        assert await broker.send_input("t", None)
        assert not await broker.send_input("t", "")  # so a flood of empty chunks is capped too
        assert not await broker.send_input("t", None)
        assert [await bounded(channel.get()) for _ in range(4)] == ["defg", "12345", "", None]
        await channel.close()


# Only the shared broker: two instances on one prefix are two processes of a cluster


async def test_an_event_published_on_one_node_reaches_a_subscriber_on_another(shared: Backend):
    async with shared.broker() as a, shared.broker() as b:
        await a.publish("t", {"n": 1})
        got: list[dict] = []

        async def follow() -> None:
            async for event in b.subscribe("t"):
                got.append(event)

        task = asyncio.ensure_future(follow())
        await bounded(started(task, got, 1))
        published = [await a.publish("t", {"n": 2}), await a.publish("t", {"n": 3}, final=True)]
        await bounded(task)
        assert [e["seq"] for e in got] == [1, 2, 3]
        assert [e.raw for e in got[1:]] == [e.raw for e in published]
        assert await b.has_log("t") and await b.last_seq("t") == 3


async def test_local_subscribers_of_one_run_share_one_redis_reader(shared: Backend):
    client = redis_client()
    async with shared.broker() as a, shared.broker() as b:
        await a.publish("t", {"n": 0})
        tasks = [asyncio.ensure_future(collect(b, "t")) for _ in range(100)]
        for n in range(1, 10):
            await a.publish("t", {"n": n})
        connections = [c for c in client.client_list() if c["name"] == f"{shared.prefix}:{b.consumer}"]
        assert 1 <= len(connections) <= 3  # commands, the one event reader (and one being replaced)
        await a.publish("t", {"n": 10}, final=True)
        for events in await bounded(asyncio.gather(*tasks)):
            assert [e["n"] for e in events] == list(range(11))
    client.close()


async def test_subscribers_joining_many_runs_while_they_stream_miss_nothing(shared: Backend):
    tokens = [f"run{i}" for i in range(20)]
    async with shared.broker() as a, shared.broker() as b:
        tasks: list[tuple[int, asyncio.Future]] = []
        for n in range(1, 11):
            for token in tokens:
                await a.publish(token, {"n": n}, final=n == 10)
            for token in tokens[: 2 * n]:  # new streams join the shared reader while others flow
                tasks.append((n - 1, asyncio.ensure_future(collect(b, token, since=n - 1))))
            await asyncio.sleep(0.01)
        for since, task in tasks:
            assert [e["n"] for e in await bounded(task)] == list(range(since + 1, 11))


async def test_stdin_sent_on_one_node_is_read_by_the_worker_on_another(shared: Backend):
    async with shared.broker(max_pending_input=5) as a, shared.broker(max_pending_input=5) as b:
        channel = await b.open_input("t")
        reading = asyncio.ensure_future(channel.get())
        assert await a.send_input("t", "12")
        assert await bounded(reading) == "12"
        assert await a.send_input("t", "345")
        assert not await b.send_input("t", "6789")  # the cap is cluster-wide
        assert await a.send_input("t", None)
        assert [await bounded(channel.get()) for _ in range(2)] == ["345", None]
        await channel.close()


async def test_a_job_left_by_a_dead_worker_is_delivered_again(shared: Backend):
    async with shared.broker(visibility_timeout=1.0) as b:
        a = shared.make(visibility_timeout=1.0)
        await a.open()
        await a.enqueue("t")
        taken = await bounded(a.dequeue())
        assert taken.attempt == 1
        await a.close()  # killed before its ack: nothing keeps the job alive any more
        again = await bounded(b.dequeue())
        assert (again.token, again.attempt, again.receipt) == ("t", 2, taken.receipt)
        await b.ack(again)
        assert await b.tracked() == set() and await b.depth() == 0


@pytest.mark.slow
async def test_a_job_held_by_a_live_worker_is_not_taken_past_the_timeout(shared: Backend):
    async with shared.broker(visibility_timeout=1.0) as b:
        a = shared.make(visibility_timeout=1.0)
        await a.open()
        await a.enqueue("long run")
        held = await bounded(a.dequeue())
        waiting = asyncio.ensure_future(b.dequeue())
        await asyncio.sleep(3.0)  # three visibility timeouts with the worker alive
        assert not waiting.done()
        assert await b.tracked() == {"long run"}
        await a.close()  # now it dies
        again = await bounded(waiting)
        assert (again.token, again.attempt, again.receipt) == ("long run", 2, held.receipt)
        await b.ack(again)


async def test_depth_and_tracked_count_across_nodes(shared: Backend):
    async with shared.broker() as a, shared.broker() as b:
        for token in ("x", "y", "z"):
            await a.enqueue(token)
        assert await b.depth() == 3
        job = await bounded(b.dequeue())
        assert job.token == "x"
        assert await a.depth() == 2
        assert await a.tracked() == {"x", "y", "z"}
        await b.ack(job)
        assert await a.tracked() == {"y", "z"}


async def test_one_node_holds_a_lock_at_a_time(shared: Backend):
    async with shared.broker() as a, shared.broker() as b:
        assert await a.try_lock("reconcile", 30.0)
        assert not await b.try_lock("reconcile", 30.0)
        assert await b.try_lock("other", 30.0)


async def test_the_queue_works_again_after_redis_lost_its_data(shared: Backend):
    client = redis_client()
    async with shared.broker() as broker:
        await broker.enqueue("before")
        await broker.publish("t", {"n": 1})
        for key in client.scan_iter(f"{shared.prefix}:*"):  # what a Redis restart without disk does
            client.delete(key)
        assert await broker.tracked() == set() and await broker.depth() == 0
        await broker.enqueue("after")
        job = await bounded(broker.dequeue())  # the consumer group is created again
        assert job.token == "after"
        await broker.ack(job)
        assert (await broker.publish("t", {"n": 1}))["seq"] == 1
    client.close()


async def test_an_unreachable_redis_raises_promptly(redis_prefix: str):
    from runflare_server.broker.redis import RedisBroker

    broker = RedisBroker("redis://127.0.0.1:1/0", prefix=redis_prefix)
    with pytest.raises(BrokerUnavailable):
        await bounded(broker.open())
    assert not await bounded(broker.ping())
    for call in (broker.enqueue("t"), broker.dequeue(), broker.depth(), broker.tracked(),
                 broker.publish("t", {}), broker.has_log("t"), broker.last_seq("t"),
                 broker.send_input("t", "x"), collect(broker, "t")):
        with pytest.raises(BrokerUnavailable):
            await bounded(call)
    await bounded(broker.close())


@pytest.mark.slow
async def test_a_redis_that_does_not_answer_raises_promptly(redis_prefix: str):
    from runflare_server.broker.redis import RedisBroker

    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        broker = RedisBroker(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", prefix=redis_prefix)
        with pytest.raises(BrokerUnavailable):
            await bounded(broker.open())
        assert not await bounded(broker.ping())
        with pytest.raises(BrokerUnavailable):
            await bounded(broker.enqueue("t"))
        await bounded(broker.close())


async def test_a_followed_stream_that_vanishes_ends_its_subscribers_with_unavailable(shared: Backend):
    client = redis_client()
    async with shared.broker() as a, shared.broker() as b:
        await a.publish("t", {"n": 1})
        got: list[dict] = []

        async def follow() -> None:
            async for event in b.subscribe("t"):
                got.append(event)

        task = asyncio.ensure_future(follow())
        await bounded(started(task, got, 1))
        client.delete(f"{shared.prefix}:events:t", f"{shared.prefix}:seq:t")  # Redis lost its data
        with pytest.raises(BrokerUnavailable):
            await bounded(task)
    client.close()


async def test_a_node_whose_connections_were_dropped_works_again(shared: Backend):
    client = redis_client()
    async with shared.broker() as a, shared.broker() as b:
        await a.enqueue("t")
        await a.publish("t", {"n": 1})
        for connection in client.client_list():  # as when Redis restarts
            if connection["name"] == f"{shared.prefix}:{b.consumer}":
                client.client_kill_filter(_id=connection["id"])
        assert await b.ping()
        job = await bounded(b.dequeue())
        assert job.token == "t"
        await b.ack(job)
        assert await b.last_seq("t") == 1
        following = asyncio.ensure_future(collect(b, "t"))
        await a.publish("t", {"n": 2}, final=True)
        assert [e["n"] for e in await bounded(following)] == [1, 2]
    client.close()


async def test_every_job_of_dead_workers_comes_back_counting_attempts(shared: Backend):
    tokens = [f"t{i}" for i in range(15)]  # more than XAUTOCLAIM would look at in one call
    first = shared.make(visibility_timeout=1.0)
    await first.open()
    for token in tokens:
        await first.enqueue(token)
    assert {(await bounded(first.dequeue())).token for _ in tokens} == set(tokens)
    await first.close()
    second = shared.make(visibility_timeout=1.0)
    await second.open()
    again = [await bounded(second.dequeue()) for _ in tokens]
    assert sorted(j.token for j in again) == sorted(tokens) and {j.attempt for j in again} == {2}
    await second.ack(again[0])
    await second.close()
    async with shared.broker(visibility_timeout=1.0) as third:
        last = [await bounded(third.dequeue()) for _ in tokens[1:]]
        assert sorted(j.token for j in last) == sorted(tokens[1:]) and {j.attempt for j in last} == {3}
        for job in last:
            await third.ack(job)
        assert await third.tracked() == set() and await third.depth() == 0


async def test_runs_join_the_shared_reader_without_new_connections(shared: Backend):
    """A stream joins the reader's XREAD through the reader's own wake stream: the read in flight ends
    with an answer, so its connection is kept (a cancelled read costs redis-py its socket)."""
    client = redis_client()

    def connection_ids(broker: Any) -> set[int]:
        return {c["id"] for c in client.client_list() if c["name"] == f"{shared.prefix}:{broker.consumer}"}

    async with shared.broker() as a, shared.broker() as b:
        await a.publish("first", {"n": 0})
        first = asyncio.ensure_future(collect(b, "first"))
        await asyncio.sleep(0.05)
        before = connection_ids(b)
        joined = []
        for i in range(10):
            await a.publish(f"run{i}", {"n": 0})
            joined.append(asyncio.ensure_future(collect(b, f"run{i}")))
            await asyncio.sleep(0.02)  # the reader is back in its XREAD when the next run joins
            await a.publish(f"run{i}", {"n": 1}, final=True)
            assert [e["n"] for e in await bounded(joined[-1])] == [0, 1]
        assert connection_ids(b) == before
        await a.publish("first", {"n": 1}, final=True)
        assert [e["n"] for e in await bounded(first)] == [0, 1]
        wake_key = b._wake_key
    assert not client.exists(wake_key)  # a closed broker leaves no wake stream behind
    client.close()


async def test_a_subscriber_right_after_announce_reads_nothing_twice(shared: Backend):
    """The announcing node knows what a new stream holds: its wait=true subscriber starts from that (no
    XRANGE) and misses nothing published meanwhile by another node."""
    client = redis_client()

    def xranges() -> int:
        return int(client.info("commandstats").get("cmdstat_xrange", {}).get("calls", 0))

    async with shared.broker() as api, shared.broker() as worker:
        await api.announce("t", [{"n": 1}, {"n": 2}])
        await worker.publish_many("t", [{"n": 3}, {"n": 4}])  # before the subscriber comes
        before = xranges()
        following = asyncio.ensure_future(collect(api, "t"))
        await asyncio.sleep(0.05)
        assert xranges() == before
        await worker.publish("t", {"n": 5}, final=True)
        assert [(e["seq"], e["n"]) for e in await bounded(following)] == [(n, n) for n in range(1, 6)]
        await api.announce("old", [{"n": 1}])
        api._opened["old"] = (0.0, api._opened["old"][1])  # opened long ago: the stream is read again
        await worker.publish("old", {"n": 2}, final=True)
        assert [e["n"] for e in await bounded(collect(api, "old"))] == [1, 2]
        assert xranges() == before + 1
    client.close()


async def test_a_runs_events_sent_while_a_send_is_out_go_together_in_order(shared: Backend):
    from runflare_server.event_sender import EventSender

    client = redis_client()

    def scripts_run() -> int:
        return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    async with shared.broker() as worker, shared.broker() as api:
        await api.announce("t", [{"n": 0}])
        following = asyncio.ensure_future(collect(api, "t"))
        sender = EventSender(worker, "t")
        before = scripts_run()
        for n in range(1, 51):
            await sender.emit({"n": n})  # the run goes on: the first send is still out
        await sender.close({"n": 51}, {"n": 52})
        got = await bounded(following)
        assert [(e["seq"], e["n"]) for e in got] == [(n + 1, n) for n in range(53)]
        assert 2 <= scripts_run() - before <= 3  # the first event, the 49 queued behind it, the last two
    client.close()


async def test_a_runs_events_are_dropped_not_raised_while_the_broker_is_down(redis_prefix: str):
    from runflare_server.broker.redis import RedisBroker
    from runflare_server.event_sender import EventSender

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        broker = RedisBroker(f"redis://127.0.0.1:{closed.getsockname()[1]}/0", prefix=redis_prefix)
        sender = EventSender(broker, "t")
        await sender.emit({"n": 1})
        await bounded(sender.close({"n": 2}))
        with pytest.raises(BrokerUnavailable):
            await bounded(broker.publish("t", {"n": 3}))
        await bounded(broker.close())


async def test_wait_final_returns_at_the_final_event_and_not_before(backend: Backend):
    async with backend.broker() as broker:
        await broker.announce("t", [{"n": 1}], watch=True)
        waiting = asyncio.ensure_future(broker.wait_final("t"))
        await broker.publish_many("t", [{"n": 2}, {"n": 3}])
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await broker.publish("t", {"n": 4}, final=True)
        await bounded(waiting)
        await bounded(broker.wait_final("t"))  # asked again: it has ended already


async def test_a_watched_runs_end_reaches_its_node_without_it_reading_the_run(shared: Backend):
    """The node that announced a wait=true run is told of its final event on its own wake stream; it does
    not follow the run's stream. Any other node follows the run's events."""
    client = redis_client()

    def xread_calls() -> int:
        return int(client.info("commandstats").get("cmdstat_xread", {}).get("calls", 0))

    async with shared.broker() as api, shared.broker() as worker, shared.broker() as other:
        await api.announce("t", [{"n": 1}], watch=True)
        watching = asyncio.ensure_future(api.wait_final("t"))
        await asyncio.sleep(0.05)
        reads = xread_calls()
        for n in range(2, 12):
            await worker.publish("t", {"n": n})
            await asyncio.sleep(0.005)
        assert not watching.done() and "t" not in api._follows
        assert xread_calls() <= reads + 1  # ten events; the api node read none of them (a read may time out)
        following = asyncio.ensure_future(other.wait_final("t"))
        await asyncio.sleep(0.05)
        assert not following.done() and "t" in other._follows
        await worker.publish("t", {"n": 12}, final=True)
        await bounded(asyncio.gather(watching, following))
        assert not client.exists(f"{shared.prefix}:watcher:t")
    client.close()


async def test_a_watched_run_s_small_stored_result_comes_with_its_end(shared: Backend, monkeypatch):
    """The node waiting for a run gets the stored submission with the final publish when it is small (it
    needs no store read), not when it is large; a result with a publish that is not final is not told. The
    node trims what it has read of its wake stream, so told results do not pile up in Redis."""
    from runflare_server.broker import redis as redis_broker
    from runflare_server.broker.redis import RESULT_TOLD_MAX

    monkeypatch.setattr(redis_broker, "TRIM_WAKE_AFTER", 1)

    client = redis_client()
    small = {"token": "s", "status_id": 3, "stdout": "hi\n\udcff", "time": 0.012, "outputs": [{"a": [1, None]}]}
    big = {"token": "b", "status_id": 3, "outputs": [{"data": "x" * RESULT_TOLD_MAX}]}
    async with shared.broker() as api, shared.broker() as worker:
        for token in ("b", "s"):
            await api.announce(token, [{"n": 1}], watch=True)
        waiting = {token: asyncio.ensure_future(api.wait_final(token)) for token in ("b", "s")}
        await asyncio.sleep(0.05)
        await worker.publish_many("s", [{"n": 2}], result=small)  # not final: nothing to tell
        await worker.publish_many("b", [{"n": 2}], final=True, result=big)
        assert await bounded(waiting["b"]) is None  # the caller reads the store
        await worker.publish_many("s", [{"n": 3}], final=True, result=small)
        assert await bounded(waiting["s"]) == small
        wake = f"{shared.prefix}:wake:{api.consumer}"

        async def trimmed() -> None:  # only the last entry read is left (the trim is in the background)
            while client.xlen(wake) > 1:
                await asyncio.sleep(0.01)

        await bounded(trimmed())
        ((_id, fields),) = client.xrange(wake)
        assert fields[b"final"] == b"s" and b"result" in fields
    client.close()


async def test_a_watched_run_lost_with_redis_s_data_ends_its_wait(shared: Backend):
    client = redis_client()
    async with shared.broker() as api:
        await api.announce("t", [{"n": 1}], watch=True)
        waiting = asyncio.ensure_future(api.wait_final("t"))
        await asyncio.sleep(0.05)
        for key in client.scan_iter(f"{shared.prefix}:*"):  # what a Redis restart without disk does
            client.delete(key)
        with contextlib.suppress(BrokerUnavailable):  # "the event stream was lost": the store tells the rest
            await bounded(waiting)
    client.close()


async def test_a_busy_node_whose_watcher_key_was_lost_still_sees_the_run_end(shared: Backend):
    """Redis lost the watcher key, the run was queued again without one and finished: the waiting node,
    whose reader never goes quiet (another run streams), lets the waiter follow the run's stream."""
    client = redis_client()
    async with shared.broker() as api, shared.broker() as worker:
        await worker.publish("busy", {"n": 0})
        busy = asyncio.ensure_future(collect(api, "busy"))

        async def stream() -> None:
            for n in range(1, 60):
                await worker.publish("busy", {"n": n})
                await asyncio.sleep(0.05)
            await worker.publish("busy", {"n": 60}, final=True)

        streaming = asyncio.ensure_future(stream())
        await api.announce("t", [{"n": 1}], watch=True)
        waiting = asyncio.ensure_future(api.wait_final("t"))
        client.delete(f"{shared.prefix}:watcher:t", f"{shared.prefix}:events:t", f"{shared.prefix}:seq:t")
        await worker.announce("t", [{"n": 1}])  # the reconciler
        await worker.publish_many("t", [{"n": 2}, {"n": 3}], final=True)
        await asyncio.wait_for(waiting, 2.5)  # within a second or two, while the other run still streams
        assert not streaming.done()
        await bounded(asyncio.gather(streaming, busy))
    client.close()


async def test_a_waiter_let_go_past_the_bound_still_waits_for_the_end(shared: Backend, monkeypatch):
    from runflare_server.broker import redis as redis_broker

    monkeypatch.setattr(redis_broker, "WATCHED_KEPT", 2)
    async with shared.broker() as api, shared.broker() as worker:
        waiting = {}
        for token in ("a", "b", "c"):  # at "c", the waiter of "a" is let go: it follows its stream instead
            await api.announce(token, [{"n": 1}], watch=True)
            waiting[token] = asyncio.ensure_future(api.wait_final(token))
            await asyncio.sleep(0.05)
        assert not any(w.done() for w in waiting.values())
        for token in ("a", "b", "c"):
            await worker.publish(token, {"n": 2}, final=True)
        await bounded(asyncio.gather(*waiting.values()))
