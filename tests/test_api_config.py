"""Server switches: auth tokens, CORS, maintenance mode, queue size, delete, callbacks."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from conftest import free_port, start_server, wait_until
from http_client import call, get, post
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

HELLO = {"source_code": 'print("Hello!")', "language_id": 71}
LEAN = {"RUNFLARE_KERNEL_POOL": "{}"}


@pytest.fixture(scope="module")
def locked_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("locked"), "--auth-token", "s3cret", "--authz-user", "boss",
                          "--cors-origin", "null", "--cors-origin", "http://teach.example",
                          "--enable-submission-delete", "--workers", "1", "--max-queue-size", "2",
                          env={**LEAN, "RUNFLARE_MAX_BODY_SIZE": "100000"})
    yield server
    server.stop()


def test_auth_token_required(locked_server):
    api = locked_server.api
    r = get(f"{api}/languages")
    assert r.status == 401 and r.body == b""
    assert get(f"{api}/languages", headers={"X-Auth-Token": "wrong"}).status == 401
    assert get(f"{api}/languages", headers={"X-Auth-Token": "s3cret"}).status == 200
    assert get(f"{api}/languages?X-Auth-Token=s3cret").status == 200


def test_list_and_delete_need_authorized_user(locked_server):
    api, auth = locked_server.api, {"X-Auth-Token": "s3cret"}
    token = post(f"{api}/submissions?wait=true&fields=token", HELLO, headers=auth).json["token"]
    assert get(f"{api}/submissions", headers=auth).status == 403
    assert get(f"{api}/submissions", headers={**auth, "X-Auth-User": "intruder"}).status == 403
    listing = get(f"{api}/submissions?per_page=1", headers={**auth, "X-Auth-User": "boss"}).json
    assert listing["submissions"][0]["token"] == token and listing["meta"]["total_count"] >= 1
    assert set(listing["meta"]) == {"current_page", "next_page", "prev_page", "total_pages", "total_count"}
    huge = get(f"{api}/submissions?page=" + "9" * 30, headers={**auth, "X-Auth-User": "boss"})
    assert huge.status == 200 and huge.json["submissions"] == []
    assert call("DELETE", f"{api}/submissions/{token}", headers=auth).status == 403
    deleted = call("DELETE", f"{api}/submissions/{token}?fields=token,stdout", headers={**auth, "X-Auth-User": "boss"})
    assert deleted.status == 200 and deleted.json == {"token": token, "stdout": "Hello!\n"}
    assert get(f"{api}/submissions/{token}", headers=auth).status == 404


def test_oversized_body_is_413_before_it_is_read(locked_server):
    body = b'{"source_code": "' + b"x" * 200_000 + b'", "language_id": 71}'
    r = post(f"{locked_server.api}/submissions", raw=body, headers={"X-Auth-Token": "s3cret"})
    assert r.status == 413 and "100000" in r.json["error"]


def test_cors(locked_server):
    api = locked_server.api
    pre = call("OPTIONS", f"{api}/submissions", headers={"Origin": "null", "Access-Control-Request-Method": "POST"})
    assert pre.status == 204
    assert pre.headers["Access-Control-Allow-Origin"] == "null"
    assert "X-Auth-Token" in pre.headers["Access-Control-Allow-Headers"]
    ok = get(f"{api}/statuses", headers={"Origin": "http://teach.example", "X-Auth-Token": "s3cret"})
    assert ok.headers["Access-Control-Allow-Origin"] == "http://teach.example"
    other = get(f"{api}/statuses", headers={"Origin": "http://evil.example", "X-Auth-Token": "s3cret"})
    assert other.headers.get("Access-Control-Allow-Origin") is None


def test_queue_full_is_503(locked_server):
    api, auth = locked_server.api, {"X-Auth-Token": "s3cret"}
    # each program waits for stdin, sent only at the end: the one worker stays busy, the queue stays full
    waiter = {"source_code": "print(input())", "language_id": 71, "interactive": True}
    first = post(f"{api}/submissions", waiter, headers=auth).json["token"]
    wait_until(lambda: get(f"{api}/submissions/{first}", headers=auth).json["status"]["id"] == 2)
    queued = [post(f"{api}/submissions", waiter, headers=auth) for _ in range(2)]
    assert [r.status for r in queued] == [201, 201]
    full = post(f"{api}/submissions", waiter, headers=auth)
    assert full.status == 503 and full.json == {"error": "queue is full"}
    assert full.headers["Retry-After"].isdigit() and int(full.headers["Retry-After"]) > 0
    for token in [first, *(r.json["token"] for r in queued)]:  # let them all finish, one after the other
        ws_url = locked_server.url.replace("http://", "ws://") + f"/api/v1/submissions/{token}/ws?X-Auth-Token=s3cret"
        with connect(ws_url) as ws:
            ws.send(json.dumps({"type": "stdin", "data": "go\n", "eof": True}))
            with pytest.raises(ConnectionClosed):  # the socket stays open until the run is over
                while True:
                    ws.recv(timeout=60)
        assert get(f"{api}/submissions/{token}", headers=auth).json["status"]["id"] == 3


def test_maintenance_mode(tmp_path):
    server = start_server(tmp_path, "--maintenance-mode", env=LEAN)
    try:
        r = post(f"{server.api}/submissions", HELLO)
        assert r.status == 503 and "maintenance" in r.json["error"]
        assert get(f"{server.api}/config_info").json["maintenance_mode"] is True
        assert get(f"{server.api}/languages").status == 200
    finally:
        server.stop()


class CallbackSink:
    """A real HTTP server recording the PUTs it receives."""

    def __init__(self, port: int, drop_first: int = 0):
        self.received: list[dict] = []
        self.attempts = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                sink.attempts += 1
                if sink.attempts <= drop_first:  # hang up without an answer: a connection error
                    self.close_connection = True
                    return
                sink.received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_callback_is_put_with_base64_result(live_server):
    sink = CallbackSink(free_port())
    try:
        url = f"http://127.0.0.1:{sink.server.server_port}/done"
        token = post(f"{live_server.api}/submissions", {**HELLO, "callback_url": url}).json["token"]
        wait_until(lambda: sink.received)
        (body,) = sink.received
        assert body["token"] == token and body["status"]["id"] == 3
        import base64
        assert base64.b64decode(body["stdout"]) == b"Hello!\n"
    finally:
        sink.close()


def test_callback_retried_on_connection_error(live_server):
    sink = CallbackSink(free_port(), drop_first=1)  # the first try is hung up on without an answer
    try:
        url = f"http://127.0.0.1:{sink.server.server_port}/late"
        token = post(f"{live_server.api}/submissions", {**HELLO, "callback_url": url}).json["token"]
        wait_until(lambda: sink.received)
        assert sink.attempts == 2 and [b["token"] for b in sink.received] == [token]
    finally:
        sink.close()


def test_callback_answered_500_is_not_retried(live_server):
    class Failing(BaseHTTPRequestHandler):
        def do_PUT(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            failing.attempts += 1
            self.send_response(500)
            self.end_headers()

        def log_message(self, *args):
            pass

    failing = HTTPServer(("127.0.0.1", 0), Failing)
    failing.attempts = 0
    threading.Thread(target=failing.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{failing.server_port}/fail"
    try:
        post(f"{live_server.api}/submissions", {**HELLO, "callback_url": url})
        log = live_server.data_dir / "server.log"
        # "answered 500" is logged where the sender gives up on the URL (a retry would log "failed (try 1)")
        wait_until(lambda: f"callback {url!r} answered 500" in log.read_text())
        assert failing.attempts == 1
        assert f"callback {url!r} failed" not in log.read_text()
    finally:
        failing.shutdown()
        failing.server_close()
