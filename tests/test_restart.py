"""Nothing is lost: a killed server's queued and running submissions run to completion on restart."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3

import psutil
import pytest
from conftest import start_server, wait_until
from http_client import get, post
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

LEAN = {"RUNFLARE_KERNEL_POOL": "{}"}
# A run that waits for a line of stdin the test sends over the WebSocket: it is running (status 2) for as long
# as the test wants, whatever the machine's speed, and finishes when the test says so.
WAITER = {"source_code": "print(input())", "language_id": 71, "interactive": True, "wall_time_limit": 20}


def status(api: str, token: str) -> int:
    return get(f"{api}/submissions/{token}").json["status"]["id"]


def ws_url(server, token: str) -> str:
    return server.url.replace("http://", "ws://") + f"/api/v1/submissions/{token}/ws"


def send_line_and_wait_for_close(ws, line: str) -> None:
    """Send the waiting program its line (and EOF), then read until the server closes the socket, which it
    does once the run is over."""
    ws.send(json.dumps({"type": "stdin", "data": line + "\n", "eof": True}))
    with pytest.raises(ConnectionClosed):
        while True:
            ws.recv(timeout=60)


def not_listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def status_in_db(data_dir, token: str) -> int:
    db = sqlite3.connect(data_dir / "runflare.sqlite3")
    try:
        (status_id,) = db.execute("SELECT status_id FROM submissions WHERE token = ?", (token,)).fetchone()
    finally:
        db.close()
    return status_id


def test_sigkill_with_queued_and_running_then_restart(tmp_path):
    server = start_server(tmp_path, "--workers", "1", env=LEAN)
    quick = {"source_code": "print('quick')", "language_id": 71}
    tokens = [post(f"{server.api}/submissions", body).json["token"] for body in (WAITER, quick, quick)]
    # the first waits for stdin that only comes after the restart: it is certainly running when the server dies,
    # and the one worker is busy with it, so the other two are certainly still queued
    wait_until(lambda: status(server.api, tokens[0]) == 2, message="the first submission is running")
    assert [status(server.api, t) for t in tokens[1:]] == [1, 1]
    children = psutil.Process(server.process.pid).children(recursive=True)
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait()
    psutil.wait_procs(children, timeout=10)

    db = sqlite3.connect(tmp_path / "runflare.sqlite3")
    stored = dict(db.execute("SELECT token, status_id FROM submissions").fetchall())
    assert set(stored) == set(tokens)  # every 201 was on disk
    assert [stored[t] for t in tokens] == [2, 1, 1]  # one running, two queued, when the server died
    db.close()

    again = start_server(tmp_path, "--workers", "1", env=LEAN, port=server.port)
    try:
        with connect(ws_url(again, tokens[0])) as ws:  # the re-queued run starts again, and waits for its line
            send_line_and_wait_for_close(ws, "slow done")
        for token, out in zip(tokens, ["slow done\n", "quick\n", "quick\n"], strict=True):
            wait_until(lambda token=token: status(again.api, token) >= 3, message=f"{token} finished")
            sub = get(f"{again.api}/submissions/{token}").json
            assert sub["status"]["id"] == 3 and sub["stdout"] == out
    finally:
        again.stop()


def test_sigterm_drains_running_submission(tmp_path):
    server = start_server(tmp_path, "--workers", "1", env=LEAN)
    token = post(f"{server.api}/submissions", WAITER).json["token"]
    # The socket is open before the SIGTERM: a draining server keeps its sockets until the runs are over (it only
    # stops listening), so the line that lets the program finish is sent after the server began to drain.
    try:
        with connect(ws_url(server, token)) as ws:
            wait_until(lambda: status(server.api, token) == 2, message="the submission is running")
            kids = psutil.Process(server.process.pid).children(recursive=True)
            server.process.send_signal(signal.SIGTERM)
            wait_until(lambda: not_listening(server.port), message="the server stopped listening (it is draining)")
            assert server.process.poll() is None and status_in_db(tmp_path, token) == 2  # still running, mid-drain
            send_line_and_wait_for_close(ws, "finished")
        assert server.process.wait(60) == 0
        gone, alive = psutil.wait_procs(kids, timeout=10)
        assert not alive, f"left running after SIGTERM: {[p.cmdline() for p in alive]}"
    finally:
        server.stop()
    assert status_in_db(tmp_path, token) == 3


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
