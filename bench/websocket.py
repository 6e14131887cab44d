"""WebSocket benchmarks: event latency, memory per idle connection, fan-out to many clients.

    python bench/websocket.py [IDLE_CONNECTIONS]

- latency: a program prints time.time() every 20 ms; each client-side receive time minus the printed
  time is the latency from the program's write, through the kernel's iopub, to the client (p50/p99);
  the same figure for 1 client and for 100 clients of one submission gives the fan-out ratio;
- memory: server RSS growth per idle connection, with IDLE_CONNECTIONS (default 10000) sockets open on a
  run that waits for interactive input (nothing is sent, so the sockets stay idle).
"""

from __future__ import annotations

import asyncio
import json
import resource
import statistics
import sys
import time

import psutil
import websockets
from common import pct, post_json, server

PRINTER = "import time\nfor i in range(150):\n    print(repr(time.time()), flush=True)\n    time.sleep(0.02)\n"


async def follow(url: str, out: list[float]) -> None:
    async with websockets.connect(url, max_size=None) as ws:
        async for raw in ws:
            now = time.time()
            message = json.loads(raw)
            if message.get("stream") == "stdout":
                for line in message["text"].split():
                    out.append(now - float(line))


async def latency(api: str, ws_base: str, clients: int) -> list[float]:
    token = post_json(api + "/submissions", {"source_code": PRINTER, "language_id": 71})["token"]
    samples: list[list[float]] = [[] for _ in range(clients)]
    await asyncio.gather(*(follow(f"{ws_base}/submissions/{token}/ws", s) for s in samples))
    return [x for s in samples for x in s]


async def idle_memory(n: int) -> tuple[float, int]:
    """Server RSS growth per socket open on a run that waits for interactive input (so nothing is sent)."""
    live = server(env={"RUNFLARE_KERNEL_POOL": "{}", "RUNFLARE_MAX_WALL_TIME_LIMIT": "600"})
    try:
        token = post_json(live.api + "/submissions", {"source_code": "input()", "language_id": 71,
                                                      "interactive": True, "wall_time_limit": 300})["token"]
        url = live.url.replace("http", "ws") + f"/api/v1/submissions/{token}/ws"
        proc = psutil.Process(live.process.pid)
        sockets = [await websockets.connect(url) for _ in range(50)]  # warm the handler path
        before = proc.memory_info().rss
        for start in range(0, n, 500):
            sockets += await asyncio.gather(*(websockets.connect(url, open_timeout=60)
                                              for _ in range(min(500, n - start))))
        await asyncio.sleep(2)
        after = proc.memory_info().rss
        opened = len(sockets) - 50
        await sockets[0].send(json.dumps({"type": "stdin", "data": "done\n", "eof": True}))
        await asyncio.gather(*(ws.close() for ws in sockets))
        return (after - before) / opened, opened
    finally:
        live.stop()


async def main(idle: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    live = server(env={"RUNFLARE_KERNEL_POOL": "{}"})
    try:
        ws_base = live.url.replace("http", "ws") + "/api/v1"
        await latency(live.api, ws_base, 1)  # warm-up
        one = await latency(live.api, ws_base, 1)
        many = await latency(live.api, ws_base, 100)
    finally:
        live.stop()
    per_conn, opened = await idle_memory(min(idle, hard - 200))
    print("\n## WebSocket\n")
    print("| measure | 1 client | 100 clients | ratio |")
    print("|---|---|---|---|")
    for name, q in (("p50 latency ms", 0.5), ("p99 latency ms", 0.99)):
        a, b = pct(one, q) * 1000, pct(many, q) * 1000
        print(f"| {name} (program write → client) | {a:.1f} | {b:.1f} | {b / a:.2f} |")
    print(f"\nevents measured: {len(one)} (1 client), {len(many)} (100 clients); "
          f"mean {statistics.mean(one) * 1000:.1f} ms / {statistics.mean(many) * 1000:.1f} ms")
    print(f"idle connections: {opened}, server memory per idle connection: {per_conn / 1024:.1f} KiB")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000))
