"""Where the time and the memory go: profiles that guide issue 13's optimisation (not a benchmark).

    python bench/profile.py program [SECONDS]     py-spy of the server and its kernels under program runs
    python bench/profile.py ws-memory [N]         tracemalloc diff per idle WebSocket, ours vs bare Tornado

`program`: sequential POST ?wait=true program runs while `py-spy record --subprocesses` samples the server
and its Run-Flare kernels; prints, per process, the heaviest functions (inclusive, on-CPU samples) and
writes the collapsed stacks next to the JSON results. `ws-memory`: the server (and the echo server) run
under bench/traced.py; snapshots after 50 warm sockets and after N more, compared by line, divided by N.
Needs py-spy in the venv for `program` (`.venv/bin/pip install py-spy`; not a project dependency).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

from common import RESULTS, free_port, post_json, raise_nofile, wait_http
from ws_clients import Clients

BENCH = Path(__file__).resolve().parent


def launch(snapdir: Path | None, target: list[str], health: str) -> subprocess.Popen:
    """Start a server process (under tracemalloc when snapdir is given) and wait until `health` answers."""
    argv = [sys.executable, *([str(BENCH / "traced.py"), str(snapdir)] if snapdir else ["-m"]), *target]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "RUNFLARE_KERNEL_POOL": "{}", "RUNFLARE_MAX_WALL_TIME_LIMIT": "600"})
    wait_http(health, proc, 90)
    return proc


def serve_args(port: int, data: str) -> list[str]:
    return ["runflare_server", "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", data]


# ---- program runs: py-spy -----------------------------------------------------------------------------

IDLE = ("select (selectors.py", "poll (", "epoll", "_wait (", "wait (threading.py", "accept (")


def summarise(collapsed: Path, top: int = 20) -> None:
    """Per process (the innermost `process N:` frame): on-CPU samples, and the functions with the most
    inclusive samples. Stacks that end in a wait (epoll, select, a lock) are counted as idle, not shown."""
    per_proc: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    idle: collections.Counter = collections.Counter()
    # a process name can span lines (the reaper's perl script is in its command line): a record ends in " N"
    for stack, count in re.findall(r"(.*?) (\d+)$", collapsed.read_text(), re.M | re.S):
        frames = stack.split(";")
        first = max((i for i, f in enumerate(frames) if f.startswith("process ")), default=0)
        proc = " ".join(frames[first].split())[:100]
        frames = frames[first + 1:]
        if not frames or any(mark in frames[-1] for mark in IDLE):
            idle[proc] += int(count)
            continue
        totals[proc] += int(count)
        for frame in set(frames):
            per_proc[proc][frame] += int(count)
    for proc, total in totals.most_common(4):
        print(f"\n### {proc}\n{total} busy samples, {idle[proc]} idle\n")
        for frame, n in per_proc[proc].most_common(top):
            print(f"{100 * n / total:5.1f}%  {frame[:150]}")


def program(seconds: int, out: Path) -> None:
    spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    if not spy:
        sys.exit("py-spy is not installed: .venv/bin/pip install py-spy")
    data = tempfile.mkdtemp(prefix="rf-profile-")
    port = free_port()
    proc = launch(None, serve_args(port, data), f"http://127.0.0.1:{port}/api/v1/health")
    api = f"http://127.0.0.1:{port}/api/v1"
    stop = threading.Event()
    runs = [0]

    def load() -> None:
        while not stop.is_set():
            assert post_json(api + "/submissions?wait=true", {"source_code": 'print("hi")', "language_id": 71})[
                "stdout"] == "hi\n"
            runs[0] += 1

    try:
        for _ in range(5):
            post_json(api + "/submissions?wait=true", {"source_code": 'print("hi")', "language_id": 71})
        worker = threading.Thread(target=load)
        worker.start()
        out.mkdir(parents=True, exist_ok=True)
        collapsed = out / f"profile-program-{time.strftime('%Y%m%dT%H%M%S')}.txt"
        subprocess.run([spy, "record", "--subprocesses", "--nonblocking", "-r", "250", "-d", str(seconds),
                        "-f", "raw", "-o", str(collapsed), "-p", str(proc.pid)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stop.set()
        worker.join()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    print(f"{runs[0]} program runs in {seconds} s; collapsed stacks in {collapsed}")
    summarise(collapsed)



# ---- idle WebSocket memory: tracemalloc ---------------------------------------------------------------

def snapshot(proc: subprocess.Popen, snapdir: Path, index: int) -> tracemalloc.Snapshot:
    proc.send_signal(signal.SIGUSR1)
    path = snapdir / f"{index}.snap"
    deadline = time.monotonic() + 120
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("no snapshot")
        time.sleep(0.2)
    return tracemalloc.Snapshot.load(str(path))


def per_socket(proc: subprocess.Popen, snapdir: Path, url: str, n: int) -> None:
    warm = Clients(url, 50, 1)
    warm.open()
    time.sleep(1)
    first = snapshot(proc, snapdir, 0)
    group = Clients(url, n, 4)
    opened = group.open()
    time.sleep(2)
    second = snapshot(proc, snapdir, 1)
    group.close()
    warm.close()
    stats = second.compare_to(first, "lineno")
    total = sum(s.size_diff for s in stats)
    print(f"traced Python memory per socket: {total / opened / 1024:.2f} KiB ({opened} sockets)\n")
    print("| bytes per socket | objects per socket | where |")
    print("|---|---|---|")
    for s in stats[:15]:
        frame = s.traceback[0]
        where = f"{frame.filename.split('site-packages/')[-1].split('server/')[-1]}:{frame.lineno}"
        print(f"| {s.size_diff / opened:.0f} | {s.count_diff / opened:.2f} | {where} |")


def ws_memory(n: int) -> None:
    import asyncio

    from websocket import INTERACTIVE, _send_go

    raise_nofile(n + 1000)
    snapdir = Path(tempfile.mkdtemp(prefix="rf-snap-"))
    port = free_port()
    proc = launch(snapdir, serve_args(port, tempfile.mkdtemp(prefix="rf-profile-")),
                  f"http://127.0.0.1:{port}/api/v1/health")
    try:
        api = f"http://127.0.0.1:{port}/api/v1"
        token = post_json(api + "/submissions", {**INTERACTIVE, "source_code": "input()"})["token"]
        url = f"ws://127.0.0.1:{port}/api/v1/submissions/{token}/ws"
        print(f"\n## Run-Flare, {n} idle sockets on one interactive submission\n")
        per_socket(proc, snapdir, url, n)
        asyncio.run(_send_go(url))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    snapdir = Path(tempfile.mkdtemp(prefix="rf-snap-"))
    port = free_port()
    proc = launch(snapdir, [str(BENCH / "echo_server.py"), str(port)], f"http://127.0.0.1:{port}/health")
    try:
        print(f"\n## bare Tornado echo server, {n} idle sockets\n")
        per_socket(proc, snapdir, f"ws://127.0.0.1:{port}/ws", n)
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["program", "ws-memory"])
    parser.add_argument("size", nargs="?", type=int, help="seconds of profile (program, default 30) or sockets "
                                                          "(ws-memory, default 2000)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where collapsed stacks go")
    args = parser.parse_args()
    if args.what == "program":
        program(args.size or 30, args.out)
    else:
        ws_memory(args.size or 2000)


if __name__ == "__main__":
    main()
