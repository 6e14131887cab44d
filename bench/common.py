"""Shared bench helpers: a throwaway server, the baselines (sandbox floor, naive bridge), timing, rows, JSON.

Every bench module has ``run(size, tiny) -> Result`` and a ``main()`` that parses ``[SIZE] [--tiny] [--out DIR]``,
prints the rows as a table and writes ``bench/results/<timestamp>-<bench>.json`` (machine info, git commit).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(ROOT / "tests"))
from conftest import LiveServer, free_port, start_server  # noqa: E402

__all__ = ["LiveServer", "free_port"]


def server(*args: str, env: dict[str, str] | None = None) -> LiveServer:
    """A real `runflare serve` in a temp data dir."""
    return start_server(Path(tempfile.mkdtemp(prefix="rf-bench-")), *args, env=env)


def ws_base(live: LiveServer) -> str:
    """The server's API root as a ws:// URL."""
    return live.url.replace("http", "ws", 1) + "/api/v1"


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    """Wait until `url` answers, while `proc` (the server) lives; kill it and raise if it never does."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"{url} did not answer") from None
            time.sleep(0.1)


def post_json(url: str, body: dict) -> Any:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def wait_all(api: str, tokens: list[str], poll: float = 0.02) -> dict[str, dict]:
    """Poll the batch API until every token is final; the final {token, status} of each."""
    pending, done = set(tokens), {}
    while pending:
        chunk = list(pending)[:20]
        got = get_json(api + "/submissions/batch?tokens=" + ",".join(chunk) + "&fields=token,status,stdout")
        for sub in got["submissions"]:
            if sub and sub["status"]["id"] > 2:
                done[sub["token"]] = sub
                pending.discard(sub["token"])
        time.sleep(poll)
    return done


# ---- timing ---------------------------------------------------------------------------------------------

def timed(fn: Callable[[], object], n: int, warmup: int = 2) -> list[float]:
    """Wall seconds of n calls, after warmup calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def interleaved(fns: dict[str, Callable[[], object]], n: int, warmup: int = 2) -> dict[str, list[float]]:
    """Wall seconds of n calls of each fn, taken in turns (a, b, a, b, ...) after warmup calls of each, so a
    change in the machine's load hits every variant alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(n):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t0)
    return out


def parallel(fn: Callable[[], object], n: int, workers: int | None = None) -> float:
    """Seconds to make n calls of fn, `workers` (default: CPUs) at a time."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        list(pool.map(lambda _: fn(), range(n)))
    return time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summary(values: list[float]) -> dict[str, float]:
    """n, p50, p90, p99 and mean of seconds, in milliseconds."""
    return {"n": len(values), "p50_ms": pct(values, 0.5) * 1000, "p90_ms": pct(values, 0.9) * 1000,
            "p99_ms": pct(values, 0.99) * 1000, "mean_ms": statistics.mean(values) * 1000}


# ---- baselines ------------------------------------------------------------------------------------------

_slot = threading.local()


def _slot_uid() -> int | None:
    """This thread's sandbox uid (a leased slot, as each Run-Flare kernel holds one), or None unprivileged."""
    from runflare_server.engine.sandbox import policy

    if not policy.per_slot_uids():
        return None
    if getattr(_slot, "lease", None) is None:
        _slot.lease = policy.UidLease.acquire()
    return _slot.lease.uid


def sandboxed(argv: list[str], workdir: Path, env: dict[str, str], ro: list[str] = ()) -> bytes:
    """Run argv in the same sandbox a program run gets (slot uid, seccomp, view); no cgroup, reaper or kernel.
    Returns stdout; raises if it fails."""
    from runflare_server.engine.sandbox import process as sandbox
    from runflare_server.engine.sandbox import seccomp

    fd = seccomp.bpf_fd()
    try:
        cmd = sandbox.wrap(argv, workdir=workdir, mode=sandbox.resolve_mode("auto"), env=env, ro_paths=ro,
                           uid=_slot_uid(), seccomp_fd=fd)
        done = subprocess.run(cmd, capture_output=True, pass_fds=(fd,), timeout=120)
    finally:
        os.close(fd)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {done.returncode}: {done.stderr[-2000:]!r}")
    return done.stdout


def run_direct(language_id: int, source: str) -> bytes:
    """Compile (if the language needs it) and run one program directly in the sandbox; its stdout."""
    from runflare_server.engine.runs import languages as langs
    from runflare_server.engine.sandbox import process as sandbox

    lang = langs.BY_ID[language_id]
    uid = _slot_uid()
    work = sandbox.new_workdir(uid=uid)
    try:
        path = work / lang.source_file
        path.write_text(source)
        if uid is not None:
            os.chown(path, uid, uid)
        env = sandbox.sandbox_env(lang.env, path=os.pathsep.join([*langs.tool_dirs(lang), sandbox.DEFAULT_PATH]))
        ro = langs.ro_paths(lang)
        if lang.compile_cmd:
            sandboxed(langs.expand(lang.compile_cmd, memory_kb=512_000), work, env, ro)
        return sandboxed(langs.expand(lang.run_cmd), work, env, ro)
    finally:
        sandbox.remove_workdir(work)


def floor() -> None:
    """The floor of a program run: ``python3 -c 'print("hi")'`` in the same sandbox."""
    from runflare_server.engine.runs import languages as langs
    from runflare_server.engine.sandbox import process as sandbox

    work = sandbox.new_workdir(uid=_slot_uid())
    try:
        out = sandboxed([langs.tool_path("python3"), "-c", 'print("hi")'], work, sandbox.sandbox_env())
        assert out == b"hi\n", out
    finally:
        sandbox.remove_workdir(work)


def naive_bridge() -> None:
    """What a simple service does per request: start an ipykernel with jupyter_client, execute, shut it down."""
    from jupyter_client.manager import start_new_async_kernel

    async def once() -> None:
        km, kc = await start_new_async_kernel(kernel_name="python3")
        try:
            reply = await kc.execute_interactive('print("hi")', timeout=60, output_hook=lambda msg: None)
            assert reply["content"]["status"] == "ok"
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)

    asyncio.run(once())


def raise_nofile(wanted: int) -> int:
    """Raise this process's open-file limit (inherited by servers and clients it starts); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, max(soft, wanted))
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def rss(pid: int) -> int:
    """Resident bytes of a process, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


# ---- rows and results -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    """One row of issue 13's table: Run-Flare's figure, the baseline's from the same run, and their ratio."""

    key: str
    measure: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    ratio: float | None = None
    ratio_means: str = ""  # how to read the ratio, e.g. "Run-Flare / floor (lower is better)"
    goal: str = ""


@dataclasses.dataclass
class Result:
    """What one bench measured: its rows and the raw details behind them."""

    bench: str
    params: dict[str, Any]
    rows: list[Row]
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


def ratio(a: float, b: float | None) -> float | None:
    return a / b if b else None


def print_rows(rows: list[Row], title: str) -> None:
    print(f"\n## {title}\n")
    print("| measure | Run-Flare | baseline | ratio | goal |")
    print("|---|---|---|---|---|")
    for r in rows:
        base = f"{r.baseline:.2f} {r.unit} ({r.baseline_name})" if r.baseline is not None else "-"
        rat = f"{r.ratio:.2f} ({r.ratio_means})" if r.ratio is not None else "-"
        print(f"| {r.measure} | {r.value:.2f} {r.unit} | {base} | {rat} | {r.goal} |", flush=True)


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


GIT_AT_START = git_commit()  # others may commit while a long run goes on


def machine_info() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    import tornado

    return {"cpus": os.cpu_count(), "cpu_model": cpu, "memory_bytes": mem, "kernel": platform.release(),
            "python": platform.python_version(), "tornado": tornado.version, "loadavg_at_start": os.getloadavg()}


def write_results(name: str, results: list[Result], out: Path | None = None, started: float | None = None) -> Path:
    """One JSON file for a run of one or more benches; returns its path."""
    out = out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    doc = {"name": name, "created": stamp, "argv": sys.argv, "git": GIT_AT_START, "machine": machine_info(),
           "seconds": time.time() - started if started else None,
           "benches": {r.bench: {"params": r.params, "rows": [dataclasses.asdict(x) for x in r.rows],
                                 "details": r.details} for r in results}}
    path = out / f"{stamp}-{name}.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")
    return path


def cli(doc: str, full: int) -> argparse.Namespace:
    """``[SIZE] [--tiny] [--out DIR]``: SIZE defaults to `full`; --tiny picks each bench's smallest form."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("size", nargs="?", type=int, default=None, help=f"how much to measure (default {full})")
    parser.add_argument("--tiny", action="store_true", help="a few requests and sockets: proves the bench runs")
    parser.add_argument("--out", type=Path, default=None, help=f"where the JSON goes (default {RESULTS})")
    args = parser.parse_args()
    args.size = args.size if args.size is not None else full
    return args


def main_of(name: str, run: Callable[[int, bool], Result], doc: str, full: int) -> None:
    """The entry point of one bench: parse the command line, run, print, write JSON."""
    args = cli(doc, full)
    started = time.time()
    result = run(args.size, args.tiny)
    print_rows(result.rows, name)
    write_results(name, [result], args.out, started)
