"""Every bench in one run, one JSON: latency, throughput, WebSocket, classroom burst (issue 13), embedded vs
PostgreSQL + Redis (issue 12), the embedded broker's run end, what one more execute request costs a kernel run,
what a kernel run's kernel costs to start.

    python bench/all.py [--tiny] [--out DIR] [--latency N] [--throughput N] [--idle N] [--burst N] [--cluster N]
                        [--broker N] [--kernel-request N] [--kernel-start N]

Each size defaults to its bench's full size (latency 100, throughput 200, idle sockets 10,000, burst 300,
cluster 100 wait=true requests per path, broker 2000 final events, kernel-request and kernel-start 40 runs each
way). The cluster bench needs PostgreSQL at 127.0.0.1:5432 and Redis at 127.0.0.1:6379.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import broker
import burst
import cluster
import kernel_request
import kernel_start
import latency
import throughput
import websocket
from common import RESULTS, Result, print_rows, write_results

BENCHES = {"latency": latency, "throughput": throughput, "websocket": websocket, "burst": burst, "cluster": cluster,
           "broker": broker, "kernel_request": kernel_request, "kernel_start": kernel_start}
SIZE_FLAG = {"latency": "latency", "throughput": "throughput", "websocket": "idle", "burst": "burst",
             "cluster": "cluster", "broker": "broker", "kernel_request": "kernel-request",
             "kernel_start": "kernel-start"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="every bench in its smallest form")
    parser.add_argument("--out", type=Path, default=None, help=f"where the JSON goes (default {RESULTS})")
    for name, flag in SIZE_FLAG.items():
        parser.add_argument(f"--{flag}", type=int, default=BENCHES[name].FULL, help=f"the {name} bench's size")
    args = parser.parse_args()
    started = time.time()
    results = []
    for name, module in BENCHES.items():
        t0 = time.time()
        try:
            results.append(module.run(getattr(args, SIZE_FLAG[name].replace("-", "_")), args.tiny))
        except Exception as e:  # noqa: BLE001 - the other benches still run; the JSON says what failed
            traceback.print_exc()
            results.append(Result(name, {"tiny": args.tiny}, [], {"error": f"{type(e).__name__}: {e}"}))
            continue
        print_rows(results[-1].rows, f"{name} ({time.time() - t0:.0f} s)")
    print("\n# Issues 13 and 12, every row\n")
    print_rows([row for r in results for row in r.rows], "all")
    write_results("all", results, args.out, started)
    if any("error" in r.details for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
