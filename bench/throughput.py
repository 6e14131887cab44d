"""Sustained throughput of isolated submissions on this machine, against baselines run side by side.

    python bench/throughput.py [N]

N submissions of print("hi") are created at once (batch API) and followed to the end; the figure is
submissions finished per second. Baselines: the floor (`python3 -c` in bwrap, as many at once as CPUs)
and the naive bridge (start, execute, shut down an ipykernel per submission, as many at once as CPUs).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from common import post_json, server
from latency import floor, naive_bridge


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def run_batch(api: str, language_id: int, n: int) -> float:
    """Seconds to finish n submissions created at once."""
    t0 = time.perf_counter()
    tokens: list[str] = []
    for start in range(0, n, 20):
        items = [{"source_code": 'print("hi")', "language_id": language_id}] * min(20, n - start)
        tokens += [answer["token"] for answer in post_json(api + "/submissions/batch", {"submissions": items})]
    pending = set(tokens)
    while pending:
        chunk = list(pending)[:20]
        got = get_json(api + "/submissions/batch?tokens=" + ",".join(chunk) + "&fields=token,status")
        for sub in got["submissions"]:
            if sub["status"]["id"] > 2:
                assert sub["status"]["id"] == 3, sub
                pending.discard(sub["token"])
        time.sleep(0.02)
    return time.perf_counter() - t0


def parallel(fn, n: int) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(lambda _: fn(), range(n)))
    return time.perf_counter() - t0


def main(n: int) -> None:
    live = server(env={"RUNFLARE_KERNEL_POOL": '{"python3": 2}', "RUNFLARE_MAX_QUEUE_SIZE": "1000"})
    try:
        run_batch(live.api, 71, 4)
        rows = {
            "floor: python3 -c in bwrap": n / parallel(floor, n),
            "Run-Flare program runs (71)": n / run_batch(live.api, 71, n),
            "Run-Flare kernel runs (1071)": max(1, n // 4) / run_batch(live.api, 1071, max(1, n // 4)),
            "naive bridge (kernel per submission)": max(1, n // 8) / parallel(naive_bridge, max(1, n // 8)),
        }
    finally:
        live.stop()
    base = rows["naive bridge (kernel per submission)"]
    print("\n## Sustained throughput, print(\"hi\"), %d CPUs\n" % os.cpu_count())
    print("| variant | submissions/s | ratio to naive bridge |")
    print("|---|---|---|")
    for name, rate in rows.items():
        print(f"| {name} | {rate:.1f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 80)
