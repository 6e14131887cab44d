"""WebSocket benchmarks: event latency with 1 and with 100 clients, memory per idle connection.

    python bench/websocket.py [IDLE_CONNECTIONS] [--tiny] [--out DIR]

- latency: an interactive program waits for a line of stdin, then prints time.time() every 20 ms. The
  clients connect first (spread over forked client processes, see ws_clients.py), then a control socket sends the
  line; each client-side receive time minus the printed time is the latency from the program's write,
  through the kernel's iopub and the server, to the client. 1 client, then 100 clients of one submission
  (4 processes x 25 sockets).
- memory: the server's RSS growth (/proc/PID/status) per idle connection, with IDLE_CONNECTIONS sockets
  (default 10,000) open on a run that waits for interactive input, against a bare Tornado echo WebSocket
  server (bench/echo_server.py) holding as many in the same run.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import websockets
from common import (
    LiveServer,
    Result,
    Row,
    free_port,
    main_of,
    post_json,
    raise_nofile,
    ratio,
    rss,
    server,
    summary,
    wait_http,
    ws_base,
)
from ws_clients import Clients

FULL = 10_000
PRINTER = "import time\ninput()\nfor i in range({lines}):\n    print(repr(time.time()), flush=True)\n    time.sleep(0.02)\n"
INTERACTIVE = {"language_id": 71, "interactive": True, "wall_time_limit": 300}
SERVER_ENV = {"RUNFLARE_KERNEL_POOL": "{}", "RUNFLARE_MAX_WALL_TIME_LIMIT": "600"}


async def _send_go(url: str) -> None:
    """Send the program its line, and stay until the run ends (closing cancels the socket's stdin feed)."""
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "stdin", "data": "go\n", "eof": True}))
        async for _ in ws:
            pass


def latency(live: LiveServer, clients: int, processes: int, lines: int) -> list[float]:
    """Seconds from the program's write to each client, for `clients` clients of one submission."""
    sub = post_json(live.api + "/submissions", {**INTERACTIVE, "source_code": PRINTER.format(lines=lines)})
    url = f"{ws_base(live)}/submissions/{sub['token']}/ws"
    group = Clients(url, clients, processes)
    assert group.open() == clients
    group.start_follow()
    asyncio.run(_send_go(url))
    samples = group.results()
    assert samples, "no output reached the clients"
    return samples


def idle_per_socket(url: str, pid: int, n: int, processes: int) -> dict[str, float]:
    """RSS growth of process `pid` per socket when n idle sockets are open on url (after 50 warm ones)."""
    settle = 2.0 if n >= 1000 else 0.2
    warm = Clients(url, 50, 1)
    warm.open()
    time.sleep(settle)
    before = rss(pid)
    group = Clients(url, n, processes)
    opened = group.open()
    time.sleep(settle)
    after = rss(pid)
    group.close()
    warm.close()
    return {"opened": opened, "rss_before": before, "rss_after": after, "per_socket_kib": (after - before) / opened / 1024}


def echo_server() -> tuple[subprocess.Popen, str]:
    """bench/echo_server.py on a free port, once it answers; the process and its ws URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("echo_server.py")), str(port)])
    wait_http(f"http://127.0.0.1:{port}/health", proc)
    return proc, f"ws://127.0.0.1:{port}/ws"


def idle_memory(n: int, processes: int) -> tuple[dict, dict]:
    """Per idle socket: Run-Flare (sockets on a run waiting for input) and the bare echo server."""
    live = server(env=SERVER_ENV)
    try:
        sub = post_json(live.api + "/submissions", {**INTERACTIVE, "source_code": "input()"})
        url = f"{ws_base(live)}/submissions/{sub['token']}/ws"
        ours = idle_per_socket(url, live.process.pid, n, processes)
        asyncio.run(_send_go(url))  # the run ends, so the server stops at once
    finally:
        live.stop()
    proc, url = echo_server()
    try:
        bare = idle_per_socket(url, proc.pid, n, processes)
    finally:
        proc.terminate()
        proc.wait(10)
    return ours, bare


def run(n: int, tiny: bool = False) -> Result:
    n = 20 if tiny else n
    fanout, lines = (4, 10) if tiny else (100, 500)
    raise_nofile(n + 1000)
    live = server(env=SERVER_ENV)
    try:
        latency(live, 1, 1, 5)  # warm-up
        one = summary(latency(live, 1, 1, lines))
        many = summary(latency(live, fanout, 4, lines))
    finally:
        live.stop()
    ours, bare = idle_memory(n, 4)
    per, base = ours["per_socket_kib"], bare["per_socket_kib"]
    rows = [
        Row("ws_latency_1_p50", "WS event latency, 1 client, p50", one["p50_ms"], "ms", goal="-"),
        Row("ws_latency_1_p99", "WS event latency, 1 client, p99", one["p99_ms"], "ms", goal="<= 3 ms"),
        Row("ws_latency_100_p50", f"WS event latency, {fanout} clients (4 processes), p50", many["p50_ms"], "ms",
            one["p50_ms"], "1 client", ratio(many["p50_ms"], one["p50_ms"]), f"{fanout} clients / 1", "-"),
        Row("ws_latency_100_p99", f"WS event latency, {fanout} clients (4 processes), p99", many["p99_ms"], "ms",
            one["p99_ms"], "1 client", ratio(many["p99_ms"], one["p99_ms"]), f"{fanout} clients / 1", "<= 10 ms"),
        Row("ws_idle_memory", f"server memory per idle WebSocket at {ours['opened']}", per, "KiB", base,
            "bare Tornado echo socket", ratio(per, base), f"Run-Flare / bare (difference {per - base:+.1f} KiB)",
            "<= bare + 2 KiB"),
    ]
    return Result("websocket", {"idle_connections": n, "fanout_clients": fanout, "client_processes": 4,
                                "lines": lines, "tiny": tiny}, rows,
                  {"latency_1": one, "latency_fanout": many, "idle_runflare": ours, "idle_bare_tornado": bare})


if __name__ == "__main__":
    main_of("websocket", run, __doc__, FULL)
