"""A real cluster: 2 API and 2 worker processes on PostgreSQL (127.0.0.1:5432) and Redis.

Most tests share the machine's Redis (127.0.0.1:6379) under a key prefix of their own; the restart test
starts a Redis server of its own on a free loopback port, so it can kill and restart it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import LiveServer, free_port, read_all, skip_or_fail, start_server, wait_until, ws_url
from http_client import call, get, post
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

PG = "postgresql://postgres@127.0.0.1:5432/test"


def pg_schema() -> Iterator[str]:
    psycopg = pytest.importorskip("psycopg")
    name = "cluster_" + uuid.uuid4().hex[:10]
    try:
        with psycopg.connect(PG, autocommit=True, connect_timeout=3) as db:
            db.execute(f"CREATE SCHEMA {name}")
    except psycopg.OperationalError as exc:
        skip_or_fail(f"PostgreSQL at 127.0.0.1:5432 is needed: {exc}")
    yield f"{PG}?options=-csearch_path%3D{name}"
    with psycopg.connect(PG, autocommit=True) as db:
        db.execute(f"DROP SCHEMA {name} CASCADE")


def redis_keys_gone(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)
    except redis.RedisError:
        pass
    finally:
        client.close()


@dataclass
class Cluster:
    apis: list[LiveServer]
    workers: list[LiveServer]
    env: dict[str, str]
    root: Path
    extra: list[LiveServer] = field(default_factory=list)

    def stop(self) -> None:
        for server in [*self.apis, *self.workers, *self.extra]:
            server.stop()


def start_cluster(root: Path, store: str, broker: str, *, apis: int = 2, workers: int = 2,
                  **settings: str) -> Cluster:
    env = {"RUNFLARE_STORE": store, "RUNFLARE_BROKER": broker, "RUNFLARE_BROKER_PREFIX": "t" + uuid.uuid4().hex[:8],
           "RUNFLARE_MAX_QUEUE_SIZE": "5000", "RUNFLARE_KERNEL_POOL": "{}", **settings}

    def one(role: str, i: int) -> LiveServer:
        data = root / f"{role}{i}"
        data.mkdir(parents=True, exist_ok=True)
        return start_server(data, "--role", role, env={**env, "RUNFLARE_WORKERS": "2"})

    # Workers first: they migrate the schema and create the consumer group.
    started_workers = [one("worker", i) for i in range(workers)]
    started_apis = [one("api", i) for i in range(apis)]
    return Cluster(started_apis, started_workers, env, root)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if shutil.which("bwrap") is None:
        skip_or_fail("bubblewrap is needed")
    schemas = pg_schema()
    store = next(schemas)
    running = start_cluster(tmp_path_factory.mktemp("cluster"), store, "redis://127.0.0.1:6379/0",
                            RUNFLARE_VISIBILITY_TIMEOUT="3")
    yield running
    running.stop()
    redis_keys_gone("redis://127.0.0.1:6379/0", running.env["RUNFLARE_BROKER_PREFIX"])
    next(schemas, None)


def follow(server: LiveServer, token: str) -> list[dict]:
    """Every message of the submission's WebSocket on `server`, until the server closes it."""
    with connect(ws_url(server, token)) as ws:
        return read_all(ws)


def finished(server: LiveServer, token: str) -> dict | None:
    sub = get(server.api + f"/submissions/{token}?fields=status,stdout,message").json
    return sub if sub["status"]["id"] >= 3 else None


def runs_counted(workers: list[LiveServer]) -> float:
    """Finished runs by all workers, from their /metrics."""
    total = 0.0
    for worker in workers:
        text = call("GET", worker.url + "/metrics").body.decode()
        for family in text_string_to_metric_families(text):
            if family.name == "runflare_runs":
                total += sum(s.value for s in family.samples if s.name == "runflare_runs_total")
    return total


def test_roles_need_a_shared_broker(tmp_path: Path) -> None:
    from runflare_server.cli import main

    with pytest.raises(SystemExit, match="shared"):
        main(["serve", "--role", "api", "--data-dir", str(tmp_path), "--port", str(free_port())])


def test_a_run_created_on_one_api_node_is_followed_on_the_other(cluster: Cluster) -> None:
    a, b = cluster.apis
    src = "import sys\nfor i in range(5):\n    print('line', i, flush=True)\n    sys.stdin.readline()\n"
    token = post(a.api + "/submissions", {"source_code": src, "language_id": 71, "stdin": "\n" * 5}).json["token"]
    messages = follow(b, token)
    events = [m for m in messages if "seq" in m and m["type"] != "connected"]
    seqs = [m["seq"] for m in events]
    assert seqs == list(range(1, len(seqs) + 1)), seqs  # every event, in order, none twice
    assert events[0]["type"] == "status_update" and events[0]["status"]["id"] == 1
    assert events[-1]["type"] == "status_update" and events[-1]["status"]["id"] == 3
    out = "".join(m.get("text", "") for m in events if m.get("stream") == "stdout")
    assert out == "".join(f"line {i}\n" for i in range(5))
    # ?wait=true on node B for a submission created on node A.
    token2 = post(a.api + "/submissions", {"source_code": "print(6*7)", "language_id": 71}).json["token"]
    done = post(b.api + "/submissions?wait=true", {"source_code": "print(1)", "language_id": 71}).json
    assert done["status"]["id"] == 3 and done["stdout"] == "1\n"
    assert wait_until(lambda: finished(b, token2))["stdout"] == "42\n"


def test_a_wait_true_answer_is_what_a_get_returns_after(cluster: Cluster) -> None:
    """A small result comes to the waiting API node with the run's final publish (its wake stream shows
    it: the row as PostgreSQL holds it); a large one is read from the store. Either way the answer is
    exactly what a GET returns afterwards."""
    import psycopg
    import redis

    api = cluster.apis[0]
    answers = [post(api.api + "/submissions?wait=true&fields=*", {"source_code": src, "language_id": 71}).json
               for src in ('print("hi")', 'print("x" * 40000)')]
    for done in answers:
        assert done["status"]["id"] == 3, done
        assert done == get(f"{api.api}/submissions/{done['token']}?fields=*").json
    small = answers[0]["token"]
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    told = [json.loads(fields[b"result"]) for key in client.scan_iter(f"{cluster.env['RUNFLARE_BROKER_PREFIX']}:wake:*")
            for _id, fields in client.xrange(key) if fields.get(b"final") == small.encode() and b"result" in fields]
    client.close()
    with psycopg.connect(cluster.env["RUNFLARE_STORE"]) as db:
        (doc,) = db.execute("SELECT doc FROM submissions WHERE token = %s", (small,)).fetchone()
    assert told == [json.loads(doc)]


def test_interactive_stdin_typed_on_one_node_reaches_the_worker(cluster: Cluster) -> None:
    a, b = cluster.apis
    src = "name = input()\nprint('hello', name)\n"
    token = post(a.api + "/submissions", {"source_code": src, "language_id": 71, "interactive": True}).json["token"]
    with connect(ws_url(b, token)) as ws:
        ws.send(json.dumps({"type": "stdin", "data": "cluster\n", "eof": True}))
        messages = read_all(ws)
    final = [m for m in messages if m["type"] == "status_update"][-1]
    assert final["status"]["id"] == 3 and final["data"]["stdout"] == "hello cluster\n"


def test_queue_limit_is_cluster_wide(tmp_path: Path) -> None:
    schemas = pg_schema()
    store = next(schemas)
    # A worker says what it runs, then stops: nothing takes work, so the queue only grows.
    cluster = start_cluster(tmp_path, store, "redis://127.0.0.1:6379/0", workers=1,
                            RUNFLARE_MAX_QUEUE_SIZE="3")
    try:
        cluster.workers[0].stop()
        a, b = cluster.apis
        body = {"source_code": "print(1)", "language_id": 71}
        assert [post(a.api + "/submissions", body).status for _ in range(2)] == [201, 201]
        assert post(b.api + "/submissions", body).status == 201
        full = post(b.api + "/submissions", body)
        assert full.status == 503 and full.headers["Retry-After"]
        assert post(a.api + "/submissions", body).status == 503
        assert get(a.api + "/health").json["queue_depth"] == 3
    finally:
        cluster.stop()
        redis_keys_gone("redis://127.0.0.1:6379/0", cluster.env["RUNFLARE_BROKER_PREFIX"])
        next(schemas, None)


def test_a_worker_killed_mid_run_has_its_submission_finished_by_the_other(cluster: Cluster) -> None:
    api = cluster.apis[0]
    src = "import time\nprint('start', flush=True)\ntime.sleep(2)\nprint('done')\n"
    token = post(api.api + "/submissions", {"source_code": src, "language_id": 71}).json["token"]

    def running_on() -> LiveServer | None:
        for worker in cluster.workers:
            if get(worker.api + "/health").json["running"] > 0:
                return worker
        return None

    victim = wait_until(running_on, message="a worker takes the run")
    survivor = next(w for w in cluster.workers if w is not victim)
    os.killpg(victim.process.pid, signal.SIGKILL)
    victim.process.wait()

    sub = wait_until(lambda: finished(api, token), timeout=120, message="the other worker finishes it")
    assert sub["status"]["id"] == 3 and sub["stdout"] == "start\ndone\n"
    assert runs_counted([survivor]) >= 1
    # The killed worker comes back for the next tests (same data dir, same cluster settings).
    replacement = start_server(victim.data_dir, "--role", "worker", env={**cluster.env, "RUNFLARE_WORKERS": "2"})
    cluster.workers[cluster.workers.index(victim)] = replacement


def test_a_submission_that_keeps_killing_workers_ends_as_internal_error(tmp_path: Path) -> None:
    # Simulated by killing whichever worker holds it, every time: after max_attempts it ends as 13.
    schemas = pg_schema()
    store = next(schemas)
    cluster = start_cluster(tmp_path, store, "redis://127.0.0.1:6379/0", apis=1, workers=1,
                            RUNFLARE_VISIBILITY_TIMEOUT="2", RUNFLARE_MAX_ATTEMPTS="2")
    try:
        api = cluster.apis[0]
        token = post(api.api + "/submissions", {"source_code": "import time\ntime.sleep(30)",
                                                "language_id": 71, "wall_time_limit": 20}).json["token"]
        for attempt in range(2):
            worker = cluster.workers[0]
            wait_until(lambda w=worker: get(w.api + "/health").json["running"] > 0, message=f"attempt {attempt}")
            os.killpg(worker.process.pid, signal.SIGKILL)
            worker.process.wait()
            cluster.workers[0] = start_server(worker.data_dir, "--role", "worker",
                                              env={**cluster.env, "RUNFLARE_WORKERS": "2"})
        sub = wait_until(lambda: finished(api, token), timeout=120)
        assert sub["status"]["id"] == 13
        assert "attempts" in sub["message"]
    finally:
        cluster.stop()
        redis_keys_gone("redis://127.0.0.1:6379/0", cluster.env["RUNFLARE_BROKER_PREFIX"])
        next(schemas, None)


def post_batches(api: LiveServer, bodies: list[dict], batch: int = 20) -> list[str]:
    """Create every body through the batch route (retrying a 503), from a few threads at once."""
    def one_batch(chunk: list[dict]) -> list[str]:
        while True:
            r = post(api.api + "/submissions/batch", {"submissions": chunk})
            if r.status == 201:
                return [answer["token"] for answer in r.json]
            assert r.status == 503, r.body
            time.sleep(float(r.headers.get("Retry-After", "1")))

    chunks = [bodies[i:i + batch] for i in range(0, len(bodies), batch)]
    with ThreadPoolExecutor(4) as pool:
        return [token for tokens in pool.map(one_batch, chunks) for token in tokens]


def all_finished(api: LiveServer, tokens: list[str]) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for i in range(0, len(tokens), 20):
        chunk = tokens[i:i + 20]
        r = get(api.api + "/submissions/batch?tokens=" + ",".join(chunk) + "&fields=token,status,stdout")
        for sub in r.json["submissions"]:
            results[sub["token"]] = sub
    return results


def test_a_thousand_submissions_none_lost_none_run_twice(cluster: Cluster) -> None:
    before = runs_counted(cluster.workers)
    bodies = [{"source_code": f"print({i})", "language_id": 71} for i in range(1000)]
    tokens = post_batches(cluster.apis[0], bodies[:500]) + post_batches(cluster.apis[1], bodies[500:])
    assert len(set(tokens)) == 1000

    def done() -> dict[str, dict] | None:
        results = all_finished(cluster.apis[0], tokens)
        return results if all(s["status"]["id"] >= 3 for s in results.values()) else None

    results = wait_until(done, timeout=900, interval=2, message="all 1000 finish")
    assert [results[t]["stdout"] for t in tokens] == [f"{i}\n" for i in range(1000)]
    assert {s["status"]["id"] for s in results.values()} == {3}
    assert runs_counted(cluster.workers) - before == 1000  # each ran exactly once


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[str, callable]]:
    """A Redis server of this test's own on a free loopback port, and a function that restarts it
    (empty: this Redis keeps nothing on disk, like the machine's)."""
    port = free_port()
    argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
            "--dir", str(tmp_path)]
    proc = {"p": subprocess.Popen(argv, stdout=subprocess.DEVNULL)}
    url = f"redis://127.0.0.1:{port}/0"

    def up() -> bool:
        import redis

        try:
            return redis.Redis.from_url(url, socket_timeout=1).ping()
        except redis.RedisError:
            return False

    wait_until(up, timeout=20, message="redis-server starts")

    def restart(down_for: float = 1.0) -> None:
        proc["p"].kill()
        proc["p"].wait()
        time.sleep(down_for)  # the cluster sees Redis down for a while
        proc["p"] = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        wait_until(up, timeout=20, message="redis-server restarts")

    yield url, restart
    proc["p"].kill()
    proc["p"].wait()


def test_redis_restarted_during_a_load_run_loses_nothing_accepted(tmp_path: Path, own_redis) -> None:
    url, restart = own_redis
    schemas = pg_schema()
    store = next(schemas)
    cluster = start_cluster(tmp_path, store, url, apis=1, workers=2, RUNFLARE_VISIBILITY_TIMEOUT="3",
                            RUNFLARE_RECONCILE_INTERVAL="1")
    try:
        api = cluster.apis[0]
        accepted: list[tuple[int, str]] = []
        refused = 0
        for i in range(300):
            if i == 100:
                restart()
            r = post(api.api + "/submissions", {"source_code": f"print({i})", "language_id": 71}, timeout=30)
            if r.status == 201:
                accepted.append((i, r.json["token"]))
            else:
                assert r.status == 503 and r.headers["Retry-After"], r.body
                refused += 1
        assert len(accepted) >= 200

        tokens = [t for _, t in accepted]

        def done() -> dict[str, dict] | None:
            results = all_finished(api, tokens)
            return results if all(s["status"]["id"] >= 3 for s in results.values()) else None

        results = wait_until(done, timeout=600, interval=2, message="every accepted submission finishes")
        assert [results[t]["stdout"] for t in tokens] == [f"{i}\n" for i, _ in accepted]
        assert get(api.api + "/health").json["broker"]["reachable"] is True
    finally:
        cluster.stop()
        next(schemas, None)


class TcpProxy:
    """A loopback TCP proxy the test can cut: while cut, it resets every connection (PostgreSQL "down")."""

    def __init__(self, target_port: int):
        import socket
        import threading

        self.target_port = target_port
        self.cut = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def set_cut(self, cut: bool) -> None:
        import socket

        self.cut = cut
        if cut:
            for conn in self.conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.conns.clear()


def test_postgresql_briefly_down_answers_503_then_recovers(tmp_path: Path) -> None:
    schemas = pg_schema()
    store = next(schemas)
    proxy = TcpProxy(5432)
    cluster = start_cluster(tmp_path, store.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}"),
                            "redis://127.0.0.1:6379/0", apis=1, workers=1)
    try:
        api = cluster.apis[0]
        body = {"source_code": "print('up')", "language_id": 71}
        before = post(api.api + "/submissions?wait=true", body).json
        assert before["status"]["id"] == 3
        proxy.set_cut(True)
        down = post(api.api + "/submissions", body)
        assert down.status == 503 and int(down.headers["Retry-After"]) > 0, down.body
        assert get(api.api + f"/submissions/{before['token']}").status == 503
        health = get(api.api + "/health")
        assert health.status == 503 and health.json["store"]["reachable"] is False
        proxy.set_cut(False)
        after = wait_until(lambda: (r := post(api.api + "/submissions?wait=true", body)).status == 201 and r.json)
        assert after["status"]["id"] == 3 and after["stdout"] == "up\n"
    finally:
        cluster.stop()
        redis_keys_gone("redis://127.0.0.1:6379/0", cluster.env["RUNFLARE_BROKER_PREFIX"])
        next(schemas, None)


def test_a_socket_follows_a_run_whose_events_redis_lost(tmp_path: Path, own_redis) -> None:
    import redis

    url, _restart = own_redis
    schemas = pg_schema()
    store = next(schemas)
    cluster = start_cluster(tmp_path, store, url, apis=1, workers=1)
    try:
        api = cluster.apis[0]
        src = "print('ready', flush=True)\nprint('got', input())"
        token = post(api.api + "/submissions", {"source_code": src, "language_id": 71,
                                                "interactive": True}).json["token"]
        seen: list[dict] = []
        # until the program blocks on input(): no more events. Its whole line, which may come in two messages
        # ("ready", then "\n": the interactive program writes unbuffered), else the second one could open
        # the stream again after the flush below.
        with connect(ws_url(api, token)) as before:
            while "".join(m.get("text") or "" for m in seen if m.get("stream") == "stdout") != "ready\n":
                try:
                    seen.append(json.loads(before.recv(timeout=60)))
                except ConnectionClosed:
                    raise AssertionError(f"the run ended before it read stdin: {seen}") from None
        redis.Redis.from_url(url).flushall()  # the run's event stream is gone; the run goes on
        with connect(ws_url(api, token)) as ws:
            first = json.loads(ws.recv(timeout=30))
            assert first["type"] == "connected"
            status = json.loads(ws.recv(timeout=30))  # the stream, started again from the store
            assert status["type"] == "status_update" and status["status"]["id"] == 2 and status["seq"] == 1
            ws.send(json.dumps({"type": "stdin", "data": "through\n", "eof": True}))
            messages = read_all(ws)
        final = [m for m in messages if m["type"] == "status_update"][-1]
        assert final["status"]["id"] == 3 and final["data"]["stdout"] == "ready\ngot through\n"
        assert [m["seq"] for m in messages if m["type"] != "pong"] == list(range(2, 2 + len(messages)))
    finally:
        cluster.stop()
        next(schemas, None)
