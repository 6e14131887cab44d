"""Sustained throughput of print("hi") submissions, against baselines at the same concurrency.

    python bench/throughput.py [N] [--tiny] [--out DIR]

N program runs (71) are created at once (batch API, 20 per request) and followed to the end: runs finished
per second, with the server's default concurrency (one run per CPU). Its baseline is the floor (`python3 -c`
in the same sandbox) run N times, as many at once as CPUs. N/4 kernel runs (1071, a fresh kernel each)
against the naive bridge (start, execute, shut down an ipykernel per submission, as many at once as CPUs).
Each is taken ROUNDS times in turns with its baseline (the order swapped each round, the kernel pool refilled
before each): the ratio is the median of the rounds' ratios, the runs/s the medians of the rounds.
"""

from __future__ import annotations

import os
import statistics
import time

from common import Result, Row, floor, get_json, main_of, naive_bridge, parallel, post_json, server, wait_all

FULL = 200
ROUNDS = 3


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


def pools_settled(api: str, timeout: float = 60) -> None:
    """Wait until no kernel-run pool is starting kernels (seen twice, 0.1 s apart), so no refill after a
    batch overlaps the next measure."""
    deadline, quiet = time.monotonic() + timeout, 0
    while time.monotonic() < deadline and quiet < 2:
        pools = get_json(api + "/health")["engine"]["kernel_runs"]["pools"]
        quiet = quiet + 1 if all(p["starting"] == 0 for p in pools.values()) else 0
        time.sleep(0.1)


def run(n: int, tiny: bool = False) -> Result:
    n = 4 if tiny else n
    kernels, bridges = (2, 2) if tiny else (max(8, n // 4), max(6, n // 16))
    rounds = 1 if tiny else ROUNDS
    cpus = os.cpu_count() or 1
    taken: dict[str, list[float]] = {"program": [], "floor": [], "kernel": [], "bridge": []}
    live = server(env={"RUNFLARE_KERNEL_POOL": '{"python3": 2}', "RUNFLARE_MAX_QUEUE_SIZE": "1000"})
    try:
        run_batch(live.api, 71, 2 if tiny else 8)  # warm-up
        parallel(floor, cpus)
        parallel(naive_bridge, 1)
        pairs = [[("floor", lambda: n / parallel(floor, n, cpus)),
                  ("program", lambda: n / run_batch(live.api, 71, n))],
                 [("bridge", lambda: bridges / parallel(naive_bridge, bridges, cpus)),
                  ("kernel", lambda: kernels / run_batch(live.api, 1071, kernels))]]
        for r in range(rounds):  # in turns, the order swapped each round: a change in speed hits both sides
            for pair in pairs:
                for name, measure in (pair if r % 2 == 0 else pair[::-1]):
                    pools_settled(live.api)
                    taken[name].append(measure())
    finally:
        live.stop()
    program_ratio = statistics.median(p / f for p, f in zip(taken["program"], taken["floor"], strict=True))
    kernel_ratio = statistics.median(k / b for k, b in zip(taken["kernel"], taken["bridge"], strict=True))
    program, base = statistics.median(taken["program"]), statistics.median(taken["floor"])
    kernel, naive = statistics.median(taken["kernel"]), statistics.median(taken["bridge"])
    same = f"{cpus} at a time"
    rows = [
        Row("program_throughput", f"program-run throughput, {n} at once", program, "runs/s", base,
            f"python3 -c in the sandbox, {same}", round(program_ratio, 2), "Run-Flare / floor, higher is better",
            ">= 0.6"),
        Row("kernel_throughput", f"kernel-run throughput, fresh kernel each, {kernels} at once", kernel, "runs/s",
            naive, f"naive bridge, {same}", round(kernel_ratio, 2), "Run-Flare / bridge, higher is better", ">= 8"),
    ]
    return Result("throughput", {"n": n, "kernel_runs": kernels, "bridge_runs": bridges, "cpus": cpus,
                                 "rounds": rounds, "tiny": tiny}, rows,
                  {"program_runs_per_s": program, "floor_per_s": base, "kernel_runs_per_s": kernel,
                   "naive_bridge_per_s": naive, "per_round_runs_per_s": taken})


if __name__ == "__main__":
    main_of("throughput", run, __doc__, FULL)
