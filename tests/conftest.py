"""Shared fixtures: a real Run-Flare server in a subprocess, free ports, temp data dirs."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 60, interval: float = 0.05,
               message: str = "") -> T:
    """Poll `predicate` until it returns something truthy, and return that. The timeout is only a bound
    for a broken run (it fails the test), never a measurement: tests wait for a state, not for a time."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true within {timeout} s: {message or getattr(predicate, '__name__', predicate)}"
                                 f" (last value {value!r})")
        time.sleep(interval)


def skip_or_fail(why: str) -> None:
    """Skip on a developer's machine that lacks a tool; in CI (which installs everything) fail instead:
    a sandbox test must never turn green because bwrap, cgroups or a kernel went missing."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must have this: {why}")
    pytest.skip(why)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    """A `runflare serve` process listening on 127.0.0.1."""

    url: str
    port: int
    data_dir: Path
    process: subprocess.Popen

    @property
    def api(self) -> str:
        return self.url + "/api/v1"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def die_with_parent() -> None:
    """In the server's child process: SIGTERM it (a clean drain) if the test process dies first."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_server(data_dir: Path, *extra: str, env: dict[str, str] | None = None, port: int | None = None) -> LiveServer:
    """Start `runflare serve` on a free port and wait until /api/v1/health answers."""
    port = port or free_port()
    log = open(data_dir / "server.log", "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "runflare_server", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(data_dir), *extra],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        start_new_session=True, preexec_fn=die_with_parent,
    )
    url = f"http://127.0.0.1:{port}"
    headers = {"X-Auth-Token": extra[extra.index("--auth-token") + 1]} if "--auth-token" in extra else {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {(data_dir / 'server.log').read_text()[-3000:]}")
        try:
            request = urllib.request.Request(url + "/api/v1/health", headers=headers)
            with urllib.request.urlopen(request, timeout=2) as r:
                if r.status == 200:
                    return LiveServer(url, port, data_dir, proc)
        except (OSError, http.client.HTTPException):  # not up yet (or another process answered: retry)
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become healthy: " + (data_dir / "server.log").read_text()[-3000:])


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One real server for the whole session (embedded store and queue, default sandbox). Its callbacks may
    reach loopback, where the tests' receivers listen (the default refuses it: tests/test_callbacks_security.py)."""
    server = start_server(tmp_path_factory.mktemp("live-server"),
                          env={"RUNFLARE_CALLBACK_ALLOWED_NETWORKS": '["127.0.0.0/8"]'})
    yield server
    server.stop()


def reaper_comm() -> str:
    """The process name of the reaper a Run-Flare kernel's runner uses on this host (compiled, else Perl)."""
    from runflare_server.kernels import reaper_binary

    return reaper_binary.COMM if reaper_binary.fd() is not None else "perl"


def between_runs(kernel_pid: int, timeout: float = 20.0) -> list:
    """The processes under a Run-Flare kernel between runs that are not its next run's sandbox waiting:
    bubblewrap, bubblewrap's init and the reaper, the reaper with no program (``Runner.ready_next``).
    Waits (bounded) for that sandbox's start to settle; [] when the kernel holds nothing else."""
    import psutil

    def settled() -> bool:
        try:
            kids = [c for c in psutil.Process(kernel_pid).children(recursive=True)
                    if c.status() != psutil.STATUS_ZOMBIE]
            names = sorted(c.name() for c in kids)
            reaper = reaper_comm()  # what a Run-Flare kernel holds between runs: bwrap, its init, the reaper
            return names == [] or (names == sorted(["bwrap", "bwrap", reaper])
                                   and not next(c for c in kids if c.name() == reaper).children())
        except psutil.Error:
            return False

    wait_until(settled, timeout, 0.02, f"kernel {kernel_pid} holds only its next run's sandbox")
    return []


def own_descendants() -> list:
    """Processes this test process started, leaving out the subtrees of the `runflare serve` servers that
    fixtures keep running (their warm pools come and go on their own)."""
    import psutil

    mine = []
    for child in psutil.Process().children():
        try:
            cmd = child.cmdline()
            if "runflare_server" in cmd and "serve" in cmd:
                continue
            mine += [child, *child.children(recursive=True)]
        except psutil.Error:
            continue
    return mine


def ws_url(server: LiveServer, token: str, query: str = "") -> str:
    """The submission's WebSocket URL on `server`."""
    return server.url.replace("http://", "ws://") + f"/api/v1/submissions/{token}/ws" + query


def read_all(ws, limit: float = 60) -> list[dict]:
    """Every message of a (websockets sync client) socket until the server closes it."""
    import json

    from websockets.exceptions import ConnectionClosed

    messages = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            messages.append(json.loads(ws.recv(timeout=deadline - time.monotonic())))
        except ConnectionClosed:
            return messages
    raise AssertionError("socket did not close")
