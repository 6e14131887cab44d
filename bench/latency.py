"""Latency of `wait=true` for print("hi"): Run-Flare vs the sandboxed floor and vs a naive bridge.

    python bench/latency.py [N] [--tiny] [--out DIR]

- program run (71) through the real server, POST ?wait=true, p50 and p99 vs the floor: `python3 -c
  'print("hi")'` in the same sandbox (slot uid, seccomp, view), no kernel, no HTTP;
- kernel run (1071) p50 vs the naive bridge: start an ipykernel with jupyter_client, execute, shut it down;
  twice: back to back (each request right after the last: the pool's refill rate shows), and from a ready
  kernel (before each request, untimed, the bench waits until /health shows a kernel ready: the hand-off).
Requests are sequential, one at a time. The floor and the program run are taken in turns (floor, run,
floor, run, ...), so a change in the machine's speed hits both alike; the bridge runs after the server stops.
"""

from __future__ import annotations

import time

from common import (
    Result,
    Row,
    get_json,
    interleaved,
    main_of,
    naive_bridge,
    post_json,
    ratio,
    server,
    summary,
    timed,
)
from common import floor as floor_run

FULL = 100


def run(n: int, tiny: bool = False) -> Result:
    n = 3 if tiny else n
    live = server(env={"RUNFLARE_KERNEL_POOL": '{"python3": 2}'})
    try:
        url = live.api + "/submissions?wait=true"

        def program_run() -> None:
            sub = post_json(url, {"source_code": 'print("hi")', "language_id": 71})
            assert sub["stdout"] == "hi\n", sub

        def kernel_run() -> None:
            sub = post_json(url, {"source_code": 'print("hi")', "language_id": 1071})
            assert sub.get("stdout") == "hi\n", sub

        def pool_ready() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                pools = get_json(live.api + "/health")["engine"]["kernel_runs"]["pools"]
                if pools["python3"]["ready"] >= 1:
                    return
                time.sleep(0.02)

        def from_ready(count: int) -> list[float]:
            out = []
            for _ in range(count):
                pool_ready()
                t0 = time.perf_counter()
                kernel_run()
                out.append(time.perf_counter() - t0)
            return out

        warmup = 1 if tiny else 3
        taken = interleaved({"floor": floor_run, "program": program_run}, n, warmup)
        floor, program = summary(taken["floor"]), summary(taken["program"])
        kernel = summary(timed(kernel_run, n if tiny else max(20, n // 3), warmup))
        ready = summary(from_ready(n if tiny else max(20, n // 3)))
    finally:
        live.stop()
    naive = summary(timed(naive_bridge, 2 if tiny else max(5, n // 10), warmup=1))
    floor_name = "python3 -c in the same sandbox"
    rows = [
        Row("program_run_p50", "program run (71) wait=true p50", program["p50_ms"], "ms", floor["p50_ms"],
            floor_name, ratio(program["p50_ms"], floor["p50_ms"]), "Run-Flare / floor, lower is better", "<= 1.5"),
        Row("program_run_p99", "program run (71) wait=true p99", program["p99_ms"], "ms", floor["p99_ms"],
            floor_name, ratio(program["p99_ms"], floor["p99_ms"]), "Run-Flare / floor, lower is better", "<= 2.5"),
        Row("kernel_run_p50", "kernel run (1071) wait=true p50", kernel["p50_ms"], "ms", naive["p50_ms"],
            "naive start/execute/stop bridge", ratio(naive["p50_ms"], kernel["p50_ms"]),
            "times faster than the bridge", ">= 20"),
        Row("kernel_run_ready_p50", "kernel run (1071) wait=true p50, from a ready kernel", ready["p50_ms"], "ms",
            naive["p50_ms"], "naive start/execute/stop bridge", ratio(naive["p50_ms"], ready["p50_ms"]),
            "times faster than the bridge", ">= 20"),
    ]
    return Result("latency", {"n": n, "tiny": tiny}, rows,
                  {"floor": floor, "program_run": program, "kernel_run": kernel, "kernel_run_ready": ready,
                   "naive_bridge": naive})


if __name__ == "__main__":
    main_of("latency", run, __doc__, FULL)
