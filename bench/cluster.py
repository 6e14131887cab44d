"""Issue 12: the embedded path (SQLite + in-process queue) against PostgreSQL + Redis, side by side.

    python bench/cluster.py [N] [--tiny] [--out DIR]

Both shapes run at once on this machine; every process listens on 127.0.0.1:
- embedded: one `runflare serve` (role all, SQLite, in-process queue);
- PostgreSQL + Redis: one `--role api` process and one `--role worker` process (a second worker joins for
  the throughput with 2), on PostgreSQL 127.0.0.1:5432 database `test` (a schema of this run) and Redis
  127.0.0.1:6379 (a key prefix of this run). Schema and keys are removed at the end, even on failure.

Measures:
- latency of POST ?wait=true for print("hi") (71), N requests per path, sequential, the two paths taken in
  turns; p50, p99 and the difference at p50 (goal: PostgreSQL + Redis adds no more than 5 ms);
- WebSocket event latency, program write to client, 1 client (bench/websocket.py's method), both paths in turns;
- throughput: 2N program runs (71) created at once and followed to the end (bench/throughput.py's method),
  on PostgreSQL + Redis with 1 and with 2 worker processes (each RUNFLARE_WORKERS=1), against the embedded
  server with RUNFLARE_WORKERS=1 and 2 (the same total concurrency). Three rounds in turns; the best of each.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import throughput
import websocket
from common import LiveServer, Result, Row, interleaved, main_of, post_json, ratio, server, summary

FULL = 100
PG = "postgresql://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/0"
ENV = {**websocket.SERVER_ENV, "RUNFLARE_MAX_QUEUE_SIZE": "5000"}
PG_NAME = "PostgreSQL + Redis (api + worker process)"


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """While inside, SIGTERM raises SystemExit, so `finally` blocks (the clean-up) still run."""
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def drop_keys(prefix: str) -> int:
    """Delete every Redis key under `prefix`; how many."""
    import redis

    client = redis.Redis.from_url(REDIS)
    try:
        keys = list(client.scan_iter(f"{prefix}:*", count=1000))
        return client.delete(*keys) if keys else 0
    finally:
        client.close()


@contextlib.contextmanager
def backing() -> Iterator[dict[str, str]]:
    """A PostgreSQL schema and a Redis key prefix of this run; the cluster's env. Both removed on exit."""
    import psycopg

    tag = uuid.uuid4().hex[:10]
    schema, prefix = f"bench_{tag}", f"bench{tag}"
    with psycopg.connect(PG, autocommit=True, connect_timeout=3) as db:
        db.execute(f"CREATE SCHEMA {schema}")
    try:
        yield {"RUNFLARE_STORE": f"{PG}?options=-csearch_path%3D{schema}", "RUNFLARE_BROKER": REDIS,
               "RUNFLARE_BROKER_PREFIX": prefix}
    finally:
        try:
            drop_keys(prefix)
        finally:
            with psycopg.connect(PG, autocommit=True, connect_timeout=3) as db:
                db.execute(f"DROP SCHEMA {schema} CASCADE")


@dataclass
class Cluster:
    """An API process and its worker processes on PostgreSQL + Redis."""

    env: dict[str, str]
    api: LiveServer | None = None
    workers: list[LiveServer] = field(default_factory=list)

    def add_worker(self) -> LiveServer:
        self.workers.append(server("--role", "worker", env={**self.env, "RUNFLARE_WORKERS": "1"}))
        return self.workers[-1]

    def stop(self) -> None:
        for proc in [*([self.api] if self.api else []), *self.workers]:
            proc.stop()


def start_cluster(env: dict[str, str]) -> Cluster:
    """One worker (it migrates the schema and creates the consumer group), then the API process."""
    cluster = Cluster({**ENV, **env})
    try:
        cluster.add_worker()
        cluster.api = server("--role", "api", env=cluster.env)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def wait_latency(embedded: LiveServer, api: LiveServer, n: int, warmup: int) -> tuple[dict, dict]:
    """p50/p99 of POST ?wait=true for print("hi") on each path, requests taken in turns."""
    def once(live: LiveServer) -> None:
        sub = post_json(live.api + "/submissions?wait=true", {"source_code": 'print("hi")', "language_id": 71})
        assert sub["stdout"] == "hi\n", sub

    got = interleaved({"embedded": lambda: once(embedded), "pg": lambda: once(api)}, n, warmup)
    return summary(got["embedded"]), summary(got["pg"])


def ws_latency(embedded: LiveServer, api: LiveServer, lines: int, rounds: int,
               failed: list[str]) -> tuple[dict, dict]:
    """Event latency, program write to 1 client, on each path; `rounds` runs each, in turns. A run that
    sends no output is noted in `failed` and tried once more (a second failure raises)."""
    paths = {"embedded": embedded, "pg": api}
    samples: dict[str, list[float]] = {"embedded": [], "pg": []}
    for live in paths.values():
        websocket.latency(live, 1, 1, 5)  # warm-up
    for _ in range(rounds):
        for name, live in paths.items():
            try:
                samples[name] += websocket.latency(live, 1, 1, lines)
            except AssertionError as e:
                failed.append(f"{name}: {e}")
                samples[name] += websocket.latency(live, 1, 1, lines)
    return summary(samples["embedded"]), summary(samples["pg"])


def throughputs(embedded: dict[int, LiveServer], cluster: Cluster, n: int, rounds: int) -> dict[str, list[float]]:
    """Runs/s of n program runs created at once: embedded at 1 and 2 workers, PG + Redis with 1 and 2 worker
    processes; `rounds` rounds, in turns."""
    for live in embedded.values():
        throughput.run_batch(live.api, 71, 8)  # warm-up
    throughput.run_batch(cluster.api.api, 71, 8)
    got: dict[str, list[float]] = {"embedded_1": [], "pg_1": [], "pg_2": [], "embedded_2": []}
    for _ in range(rounds):
        got["embedded_1"].append(n / throughput.run_batch(embedded[1].api, 71, n))
        got["pg_1"].append(n / throughput.run_batch(cluster.api.api, 71, n))
        second = cluster.add_worker()
        try:
            throughput.run_batch(cluster.api.api, 71, 8)  # the new worker's first runs, off the clock
            got["pg_2"].append(n / throughput.run_batch(cluster.api.api, 71, n))
        finally:
            second.stop()
            cluster.workers.remove(second)
        got["embedded_2"].append(n / throughput.run_batch(embedded[2].api, 71, n))
    return got


def rows_of(wait: tuple[dict, dict], ws: tuple[dict, dict], tput: dict[str, float], n: int) -> list[Row]:
    (emb, pg), (ws_emb, ws_pg) = wait, ws
    added = pg["p50_ms"] - emb["p50_ms"]
    pg_over = "PostgreSQL + Redis / embedded"
    return [
        Row("cluster_wait_p50", "program run (71) wait=true p50, PG + Redis (api + worker)", pg["p50_ms"], "ms",
            emb["p50_ms"], "embedded", ratio(pg["p50_ms"], emb["p50_ms"]), f"{pg_over} (difference {added:+.1f} ms)",
            "<= embedded + 5 ms"),
        Row("cluster_wait_p99", "program run (71) wait=true p99, PG + Redis (api + worker)", pg["p99_ms"], "ms",
            emb["p99_ms"], "embedded", ratio(pg["p99_ms"], emb["p99_ms"]),
            f"{pg_over} (difference {pg['p99_ms'] - emb['p99_ms']:+.1f} ms)", "-"),
        Row("cluster_ws_p50", "WS event latency, 1 client, p50, PG + Redis", ws_pg["p50_ms"], "ms",
            ws_emb["p50_ms"], "embedded", ratio(ws_pg["p50_ms"], ws_emb["p50_ms"]), pg_over, "-"),
        Row("cluster_ws_p99", "WS event latency, 1 client, p99, PG + Redis", ws_pg["p99_ms"], "ms",
            ws_emb["p99_ms"], "embedded", ratio(ws_pg["p99_ms"], ws_emb["p99_ms"]), pg_over, "-"),
        Row("cluster_throughput_1", f"program-run throughput, {n} at once, PG + Redis, 1 worker process",
            tput["pg_1"], "runs/s", tput["embedded_1"], "embedded, RUNFLARE_WORKERS=1",
            ratio(tput["pg_1"], tput["embedded_1"]), f"{pg_over}, higher is better", "-"),
        Row("cluster_throughput_2", f"program-run throughput, {n} at once, PG + Redis, 2 worker processes",
            tput["pg_2"], "runs/s", tput["embedded_2"], "embedded, RUNFLARE_WORKERS=2",
            ratio(tput["pg_2"], tput["embedded_2"]), f"{pg_over}, higher is better", "-"),
        Row("cluster_scaling", "PG + Redis throughput, 2 worker processes vs 1", tput["pg_2"], "runs/s",
            tput["pg_1"], "1 worker process", ratio(tput["pg_2"], tput["pg_1"]),
            f"2 / 1 (embedded 2 / 1: {tput['embedded_2'] / tput['embedded_1']:.2f}), {os.cpu_count()} CPUs", "-"),
    ]


def run(n: int, tiny: bool = False) -> Result:
    n = 3 if tiny else n
    burst, lines, rounds = (4, 10, 1) if tiny else (2 * n, 150, 3)
    started: list[LiveServer | Cluster] = []
    failed: list[str] = []
    load_at_start = os.getloadavg()
    with terminate_as_exit(), backing() as env:
        try:
            embedded = {w: server(env={**ENV, "RUNFLARE_WORKERS": str(w)}) for w in (1, 2)}
            started += embedded.values()
            cluster = start_cluster(env)
            started.append(cluster)
            wait = wait_latency(embedded[2], cluster.api, n, 1 if tiny else 3)
            ws = ws_latency(embedded[2], cluster.api, lines, rounds, failed)
            raw = throughputs(embedded, cluster, burst, rounds)
        finally:
            for proc in reversed(started):
                proc.stop()
    best = {name: max(values) for name, values in raw.items()}
    params = {"n": n, "burst": burst, "ws_lines": lines, "rounds": rounds, "cpus": os.cpu_count(),
              "pg_path": "one --role api process + --role worker processes (RUNFLARE_WORKERS=1 each)",
              "embedded_path": "one runflare serve, SQLite + in-process queue", "tiny": tiny}
    return Result("cluster", params, rows_of(wait, ws, best, burst),
                  {"wait_embedded": wait[0], "wait_pg": wait[1],
                   "wait_p50_added_ms": wait[1]["p50_ms"] - wait[0]["p50_ms"], "ws_embedded": ws[0], "ws_pg": ws[1],
                   "throughput_runs_per_s": raw, "ws_runs_failed": failed,
                   "loadavg_at_start": load_at_start, "loadavg_at_end": os.getloadavg()})


if __name__ == "__main__":
    main_of("cluster", run, __doc__, FULL)
