"""Shared bench helpers: a throwaway server, timing, a table of medians and ratios."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import LiveServer, start_server  # noqa: E402


def server(*args: str, env: dict[str, str] | None = None) -> LiveServer:
    """A real `runflare serve` in a temp data dir."""
    return start_server(Path(tempfile.mkdtemp(prefix="rf-bench-")), *args, env=env)


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())


def timed(fn: Callable[[], object], n: int, warmup: int = 2) -> list[float]:
    """Wall seconds of n calls, after warmup calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def report(title: str, rows: dict[str, list[float]], base: str) -> None:
    """Print median/p90 per row and each median as a ratio of the `base` row's median."""
    print(f"\n## {title}\n")
    print("| variant | n | median ms | p90 ms | ratio to " + base + " |")
    print("|---|---|---|---|---|")
    ref = statistics.median(rows[base])
    for name, values in rows.items():
        med = statistics.median(values)
        print(f"| {name} | {len(values)} | {med * 1000:.1f} | {pct(values, 0.9) * 1000:.1f} | {med / ref:.2f} |")
