"""What a kernel run's fresh kernel costs to start: forked from the fork server against started directly
under bubblewrap (``fork_server=False``), the lever of the back-to-back and kernel-throughput rows.

    python bench/kernel_start.py [N] [--tiny] [--out DIR]

The engine only (``KernelRuns`` with a pool of one, real sandboxed ipykernels, no HTTP, no store): N runs
of print("hi") back to back, each waiting for the pool's refill first, then the pool's own start figures
(``/health``'s ``avg_start_cpu_s`` and ``avg_start_wall_s``: the kernel's processes' CPU and the wall time
until it is ready). The two ways run in turns, in blocks of five runs. The fork server needs root.
"""

from __future__ import annotations

import asyncio

from common import Result, Row, main_of, ratio

from runflare_server.engine.interface import RunRequest
from runflare_server.engine.runs.kernel_runs import KernelRuns

FULL = 40
BLOCK = 5


async def _starts(n: int) -> dict[bool, dict[str, float]]:
    """Per way (forked or not): the mean start CPU and wall (ms) of the kernels started for n runs."""
    engines = {forked: KernelRuns(pool_sizes={"python3": 1}, fork_server=forked)
               for forked in (True, False)}
    for engine in engines.values():
        await engine.start()
    try:
        for done in range(0, n, BLOCK):
            for engine in engines.values():
                for _ in range(min(BLOCK, n - done)):
                    await engine.wait_ready(60)
                    result = await engine.run(RunRequest(token="bench", source_code='print("hi")',
                                                         language_id=1071), lambda event: None)
                    assert result.stdout == "hi\n", result
                await engine.wait_ready(60)
        out = {}
        for forked, engine in engines.items():
            pool = engine.health()["pools"]["python3"]
            if pool["fork_server"] is not forked:
                raise RuntimeError(f"the fork server is {'not ' if forked else ''}in use here (it needs root)")
            out[forked] = {"cpu_ms": pool["avg_start_cpu_s"] * 1000, "wall_ms": pool["avg_start_wall_s"] * 1000,
                           "started": pool["started"]}
        return out
    finally:
        for engine in engines.values():
            await engine.stop()


def run(n: int, tiny: bool = False) -> Result:
    n = 2 if tiny else n
    out = asyncio.run(_starts(n))
    forked, direct = out[True], out[False]
    rows = [
        Row("kernel_start_cpu", "kernel start, CPU until ready (forked)", forked["cpu_ms"], "ms", direct["cpu_ms"],
            "started directly under bubblewrap", ratio(forked["cpu_ms"], direct["cpu_ms"]),
            "forked / direct, lower is better", "< 1"),
        Row("kernel_start_wall", "kernel start, wall time until ready (forked)", forked["wall_ms"], "ms",
            direct["wall_ms"], "started directly under bubblewrap", ratio(forked["wall_ms"], direct["wall_ms"]),
            "forked / direct, lower is better", "< 1"),
    ]
    return Result("kernel_start", {"n": n, "tiny": tiny}, rows, {"forked": forked, "direct": direct})


if __name__ == "__main__":
    main_of("kernel_start", run, __doc__, FULL)
