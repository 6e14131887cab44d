"""Sustained throughput of print("hi") submissions, against baselines at the same concurrency.

    python bench/throughput.py [N] [--tiny] [--out DIR]

N program runs (71) are created at once (batch API, 20 per request) and followed to the end: runs finished
per second, with the server's default concurrency (one run per CPU). Its baseline is the floor (`python3 -c`
in the same sandbox) run N times, as many at once as CPUs. N/4 kernel runs (1071, a fresh kernel each)
against the naive bridge (start, execute, shut down an ipykernel per submission, as many at once as CPUs).
"""

from __future__ import annotations

import os
import time

from common import Result, Row, floor, main_of, naive_bridge, parallel, post_json, ratio, server, wait_all

FULL = 200


def run_batch(api: str, language_id: int, n: int) -> float:
    """Seconds to finish n print("hi") submissions created at once; every one must be Accepted."""
    t0 = time.perf_counter()
    tokens: list[str] = []
    for start in range(0, n, 20):
        items = [{"source_code": 'print("hi")', "language_id": language_id}] * min(20, n - start)
        tokens += [answer["token"] for answer in post_json(api + "/submissions/batch", {"submissions": items})]
    for sub in wait_all(api, tokens).values():
        assert sub["status"]["id"] == 3, sub
    return time.perf_counter() - t0


def run(n: int, tiny: bool = False) -> Result:
    n = 4 if tiny else n
    kernels, bridges = (2, 2) if tiny else (max(8, n // 4), max(6, n // 16))
    cpus = os.cpu_count() or 1
    live = server(env={"RUNFLARE_KERNEL_POOL": '{"python3": 2}', "RUNFLARE_MAX_QUEUE_SIZE": "1000"})
    try:
        run_batch(live.api, 71, 2 if tiny else 8)  # warm-up
        program = n / run_batch(live.api, 71, n)
        kernel = kernels / run_batch(live.api, 1071, kernels)
    finally:
        live.stop()
    parallel(floor, cpus)
    base = n / parallel(floor, n, cpus)
    naive = bridges / parallel(naive_bridge, bridges, cpus)
    same = f"{cpus} at a time"
    rows = [
        Row("program_throughput", f"program-run throughput, {n} at once", program, "runs/s", base,
            f"python3 -c in the sandbox, {same}", ratio(program, base), "Run-Flare / floor, higher is better",
            ">= 0.6"),
        Row("kernel_throughput", f"kernel-run throughput, fresh kernel each, {kernels} at once", kernel, "runs/s",
            naive, f"naive bridge, {same}", ratio(kernel, naive), "Run-Flare / bridge, higher is better", ">= 8"),
    ]
    return Result("throughput", {"n": n, "kernel_runs": kernels, "bridge_runs": bridges, "cpus": cpus,
                                 "tiny": tiny}, rows,
                  {"program_runs_per_s": program, "floor_per_s": base, "kernel_runs_per_s": kernel,
                   "naive_bridge_per_s": naive})


if __name__ == "__main__":
    main_of("throughput", run, __doc__, FULL)
