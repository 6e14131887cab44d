"""The benches of issues 13 and 12 keep working: each runs once in its tiny form and writes well-formed JSON with
every row. No timing is asserted (figures live in docs/benchmarks.md)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import skip_or_fail

BENCH = Path(__file__).resolve().parent.parent / "bench"
ROWS = {
    "latency": {"program_run_p50", "program_run_p99", "kernel_run_p50", "kernel_run_ready_p50"},
    "throughput": {"program_throughput", "kernel_throughput"},
    "websocket": {"ws_latency_1_p50", "ws_latency_1_p99", "ws_latency_100_p50", "ws_latency_100_p99",
                  "ws_idle_memory"},
    "burst": {"burst_last_finished", "burst_accepted"},
    "cluster": {"cluster_wait_p50", "cluster_wait_p99", "cluster_ws_p50", "cluster_ws_p99", "cluster_throughput_1",
                "cluster_throughput_2", "cluster_scaling"},
    "broker": {"broker_final_publish"},
    "kernel_request": {"kernel_run_one_request", "kernel_run_one_request_cpu"},
    "kernel_start": {"kernel_start_cpu", "kernel_start_wall"},
}


@pytest.fixture
def pg_and_redis() -> None:
    """The cluster bench needs PostgreSQL (127.0.0.1:5432, database test) and Redis (127.0.0.1:6379)."""
    import psycopg
    import redis

    try:
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", connect_timeout=3):
            pass
        with redis.Redis(socket_connect_timeout=3) as client:
            client.ping()
    except (psycopg.Error, redis.RedisError) as exc:
        skip_or_fail(f"PostgreSQL and Redis on 127.0.0.1 are needed: {exc}")


def bench(script: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=BENCH.parent)


def only_json(out: Path) -> dict:
    files = list(out.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def check_rows(name: str, entry: dict) -> None:
    rows = {row["key"]: row for row in entry["rows"]}
    assert set(rows) == ROWS[name]
    for row in rows.values():
        assert isinstance(row["value"], (int, float)) and math.isfinite(row["value"]) and row["value"] >= 0, row
        assert row["unit"] and row["measure"] and row["goal"], row
        if row["baseline"] is not None:
            assert row["ratio"] is not None and row["ratio"] >= 0 and row["baseline_name"], row


def test_all_benches_tiny_write_every_row(tmp_path: Path, pg_and_redis: None) -> None:
    done = bench("all.py", "--tiny", "--out", str(tmp_path), timeout=360)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = only_json(tmp_path)
    assert doc["name"] == "all" and len(doc["git"]["commit"]) == 40
    assert doc["machine"]["cpus"] >= 1 and doc["machine"]["python"]
    assert set(doc["benches"]) == set(ROWS)
    for name, entry in doc["benches"].items():
        assert entry["params"]["tiny"] is True
        check_rows(name, entry)
    burst = doc["benches"]["burst"]["details"]
    assert burst["posted"] > 0 and {"accepted", "lost", "refused_by_status"} <= set(burst)
    assert "program run (71) wait=true p50" in done.stdout
    assert doc["benches"]["cluster"]["details"]["wait_pg"]["n"] == 3


def test_one_bench_entry_point_tiny(tmp_path: Path) -> None:
    done = bench("latency.py", "--tiny", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = only_json(tmp_path)
    assert doc["name"] == "latency" and set(doc["benches"]) == {"latency"}
    check_rows("latency", doc["benches"]["latency"])


@pytest.mark.parametrize("script", ["throughput.py", "websocket.py", "burst.py", "cluster.py", "broker.py", "kernel_request.py",
                                    "kernel_start.py", "all.py"])
def test_every_entry_point_takes_a_size_and_tiny(script: str) -> None:
    done = bench(script, "--help", timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--tiny" in done.stdout and "--out" in done.stdout
