"""The embedded broker's cost of ending a run's event log, with many finished logs kept vs none.

    python bench/broker.py [N] [--tiny] [--out DIR]

The in-process broker keeps finished logs for replay (10 minutes, up to 10,000 by default), and each final
event evicts what expired or what is over the budget. N final publishes on a broker that keeps 10,000
finished logs (at its cap, so each one also evicts the oldest), against the same on an empty broker, in
turns. The ratio shows whether a run's end costs more on a server that has been busy for ten minutes.
"""

from __future__ import annotations

import asyncio
import time

from common import Result, Row, main_of, ratio, summary

from runflare_server.broker.memory import MemoryBroker

FULL = 2000
KEPT = 10_000


async def _final_publishes(n: int, kept: int) -> list[float]:
    """Seconds of each of n final publishes (a one-event log each) with `kept` finished logs kept."""
    broker = MemoryBroker(max_logs=KEPT)
    for i in range(kept):
        await broker.publish(f"old-{i}", {"type": "status_update"}, final=True)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        await broker.publish(f"new-{i}", {"type": "status_update"}, final=True)
        times.append(time.perf_counter() - t0)
    return times


def run(n: int, tiny: bool = False) -> Result:
    n = 20 if tiny else n
    kept, empty = [], []
    for _ in range(3):  # in turns
        kept += asyncio.run(_final_publishes(n // 3 + 1, 200 if tiny else KEPT))
        empty += asyncio.run(_final_publishes(n // 3 + 1, 0))
    busy, idle = summary(kept), summary(empty)
    rows = [Row("broker_final_publish", f"final event of a run, {200 if tiny else KEPT} finished logs kept, mean",
                busy["mean_ms"], "ms", idle["mean_ms"], "the same on an empty broker",
                ratio(busy["mean_ms"], idle["mean_ms"]), "kept / empty, lower is better", "about 1")]
    return Result("broker", {"n": n, "kept": 200 if tiny else KEPT, "tiny": tiny}, rows,
                  {"kept": busy, "empty": idle})


if __name__ == "__main__":
    main_of("broker", run, __doc__, FULL)
