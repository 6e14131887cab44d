"""Latency of `wait=true` for print("hi"): Run-Flare vs a naive bridge vs the sandboxed floor.

    python bench/latency.py [N]

- Run-Flare program run (71) and kernel run (1071) through the real server, POST ?wait=true;
- naive bridge: start an ipykernel with jupyter_client, execute, shut it down (what a simple service does);
- floor: `python3 -c 'print("hi")'` in the same bubblewrap sandbox, no kernel, no HTTP.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

from common import post_json, report, server, timed
from jupyter_client.manager import start_new_async_kernel

from runflare_server.engine import policy, sandbox, seccomp


def naive_bridge() -> None:
    async def once() -> None:
        km, kc = await start_new_async_kernel(kernel_name="python3")
        try:
            reply = await kc.execute_interactive('print("hi")', timeout=60, output_hook=lambda msg: None)
            assert reply["content"]["status"] == "ok"
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)

    asyncio.run(once())


_lease: policy.UidLease | None = None


def floor() -> None:
    """``python3 -c`` in the same sandbox a program run gets: a slot uid, the seccomp filter, the view."""
    global _lease
    if _lease is None and policy.per_slot_uids():
        _lease = policy.UidLease.acquire()
    uid = _lease.uid if _lease else None
    mode = sandbox.resolve_mode("auto")
    work = sandbox.new_workdir(uid=uid)
    fd = seccomp.bpf_fd()
    try:
        argv = sandbox.wrap(["python3", "-c", 'print("hi")'], workdir=work, mode=mode, env=sandbox.sandbox_env(),
                            uid=uid, seccomp_fd=fd)
        out = subprocess.run(argv, capture_output=True, check=True, pass_fds=(fd,)).stdout
        assert out == b"hi\n"
    finally:
        os.close(fd)
        sandbox.remove_workdir(work)


def main(n: int) -> None:
    live = server(env={"RUNFLARE_KERNEL_POOL": '{"python3": 2}'})
    try:
        url = live.api + "/submissions?wait=true"

        def program_run() -> None:
            assert post_json(url, {"source_code": 'print("hi")', "language_id": 71})["stdout"] == "hi\n"

        def kernel_run() -> None:
            sub = post_json(url, {"source_code": 'print("hi")', "language_id": 1071})
            assert sub.get("stdout") == "hi\n", sub

        rows = {
            "floor: python3 -c in bwrap": timed(floor, n),
            "Run-Flare program run (71)": timed(program_run, n),
            "Run-Flare kernel run (1071)": timed(kernel_run, n),
            "naive bridge (start/exec/stop ipykernel)": timed(naive_bridge, max(3, n // 3), warmup=1),
        }
    finally:
        live.stop()
    report('wait=true latency for print("hi")', rows, "floor: python3 -c in bwrap")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
