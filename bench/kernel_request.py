"""What one more execute request costs a kernel run: the run as built against the same run with a silent
set-up cell sent before its code (as Python kernel runs did until their set-up moved into the code's own
request, see ``adapters.PYTHON_SETUP``).

    python bench/kernel_request.py [N] [--tiny] [--out DIR]

The engine only (``KernelRuns``, real sandboxed kernels from a pool of two, no HTTP, no store): N runs of
print("hi") each way, in turns, each from a ready kernel (the bench waits for the pool first, untimed). It
reports the wall time of ``KernelRuns.run`` and the kernel's CPU during the run (``time`` of the result).
"""

from __future__ import annotations

import asyncio
import time

from common import Result, Row, main_of, ratio, summary

from runflare_server.engine.interface import RunRequest
from runflare_server.engine.jupyter.adapters import PythonKernel
from runflare_server.engine.runs.kernel_runs import KernelRuns

FULL = 40
SET_UP_CELL = "__import__('sys').modules.get('_rf_nothing', None)\n"  # silent, as cheap as a cell gets


_AS_BUILT = PythonKernel.preamble


def _set_up_cell(self: PythonKernel, request: RunRequest, source_file: str) -> str | None:
    return SET_UP_CELL


async def _runs(n: int) -> dict[bool, tuple[list[float], list[float]]]:
    """(wall seconds, kernel CPU seconds) of n runs without and with a set-up cell, in turns."""
    engine = KernelRuns(pool_sizes={"python3": 2})
    await engine.start()
    out: dict[bool, tuple[list[float], list[float]]] = {False: ([], []), True: ([], [])}
    try:
        await engine.wait_ready(60)
        for _ in range(n):
            for extra in (False, True):
                PythonKernel.preamble = _set_up_cell if extra else _AS_BUILT  # type: ignore[method-assign]
                await engine.wait_ready(60)
                await asyncio.sleep(0.2)  # the refill's start has settled
                t0 = time.perf_counter()
                result = await engine.run(RunRequest(token="bench", source_code='print("hi")', language_id=1071),
                                          lambda event: None)
                wall = time.perf_counter() - t0
                assert result.stdout == "hi\n", result
                out[extra][0].append(wall)
                out[extra][1].append(result.time)
    finally:
        PythonKernel.preamble = _AS_BUILT  # type: ignore[method-assign]
        await engine.stop()
    return out


def run(n: int, tiny: bool = False) -> Result:
    n = 2 if tiny else n
    out = asyncio.run(_runs(n))
    one, two = summary(out[False][0]), summary(out[True][0])
    cpu_one, cpu_two = summary(out[False][1]), summary(out[True][1])
    rows = [
        Row("kernel_run_one_request", "kernel run from a ready kernel, engine only, p50", one["p50_ms"], "ms",
            two["p50_ms"], "the same with a silent set-up cell first", ratio(one["p50_ms"], two["p50_ms"]),
            "one request / two, lower is better", "< 1"),
        Row("kernel_run_one_request_cpu", "the kernel's CPU during that run, p50", cpu_one["p50_ms"], "ms",
            cpu_two["p50_ms"], "the same with a silent set-up cell first",
            ratio(cpu_one["p50_ms"], cpu_two["p50_ms"]), "one request / two, lower is better", "< 1"),
    ]
    return Result("kernel_request", {"n": n, "tiny": tiny}, rows,
                  {"one_request": one, "with_set_up_cell": two, "cpu_one_request": cpu_one,
                   "cpu_with_set_up_cell": cpu_two})


if __name__ == "__main__":
    main_of("kernel_request", run, __doc__, FULL)
