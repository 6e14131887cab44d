"""Nothing is lost: a killed server's queued and running submissions run to completion on restart."""

from __future__ import annotations

import os
import signal
import sqlite3
import time

import psutil
from conftest import start_server
from http_client import get, post

LEAN = {"RUNFLARE_KERNEL_POOL": "{}"}


def status(api: str, token: str) -> int:
    return get(f"{api}/submissions/{token}").json["status"]["id"]


def test_sigkill_with_queued_and_running_then_restart(tmp_path):
    server = start_server(tmp_path, "--workers", "1", env=LEAN)
    slow = {"source_code": "import time; time.sleep(1.5); print('slow done')", "language_id": 71}
    quick = {"source_code": "print('quick')", "language_id": 71}
    tokens = [post(f"{server.api}/submissions", body).json["token"] for body in (slow, quick, quick)]
    deadline = time.monotonic() + 30
    while status(server.api, tokens[0]) != 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert status(server.api, tokens[2]) == 1
    children = psutil.Process(server.process.pid).children(recursive=True)
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait()
    psutil.wait_procs(children, timeout=10)

    db = sqlite3.connect(tmp_path / "runflare.sqlite3")
    stored = dict(db.execute("SELECT token, status_id FROM submissions").fetchall())
    assert set(stored) == set(tokens)  # every 201 was on disk
    db.close()

    again = start_server(tmp_path, "--workers", "1", env=LEAN, port=server.port)
    try:
        for token, out in zip(tokens, ["slow done\n", "quick\n", "quick\n"], strict=True):
            deadline = time.monotonic() + 60
            while status(again.api, token) < 3:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            sub = get(f"{again.api}/submissions/{token}").json
            assert sub["status"]["id"] == 3 and sub["stdout"] == out
    finally:
        again.stop()


def test_sigterm_drains_running_submission(tmp_path):
    server = start_server(tmp_path, "--workers", "1", env=LEAN)
    token = post(f"{server.api}/submissions",
                 {"source_code": "import time; time.sleep(1); print('finished')", "language_id": 71}).json["token"]
    deadline = time.monotonic() + 30
    while status(server.api, token) != 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    kids = psutil.Process(server.process.pid).children(recursive=True)
    assert server.stop(signal.SIGTERM) == 0
    gone, alive = psutil.wait_procs(kids, timeout=10)
    assert not alive, f"left running after SIGTERM: {[p.cmdline() for p in alive]}"
    db = sqlite3.connect(tmp_path / "runflare.sqlite3")
    (doc,) = db.execute("SELECT status_id FROM submissions WHERE token = ?", (token,)).fetchone()
    assert doc == 3
    db.close()


def test_socket_after_restart_replays_the_stored_result(tmp_path):
    import json

    from websockets.sync.client import connect

    server = start_server(tmp_path, env=LEAN)
    token = post(f"{server.api}/submissions?wait=true&fields=token",
                 {"source_code": "print('kept')", "language_id": 71}).json["token"]
    server.stop()
    again = start_server(tmp_path, env=LEAN, port=server.port)
    try:
        with connect(again.url.replace("http", "ws") + f"/api/v1/submissions/{token}/ws") as ws:
            connected = json.loads(ws.recv(timeout=10))
            final = json.loads(ws.recv(timeout=10))
            try:
                ws.recv(timeout=10)
            except Exception:  # noqa: BLE001 - the close is what we expect
                pass
        assert connected["type"] == "connected"
        assert final["seq"] == 1 and final["status"]["id"] == 3 and final["data"]["stdout"] == "kept\n"
        assert ws.close_code == 1000
    finally:
        again.stop()
