"""The submission WebSocket with real clients (the `websockets` package and tornado's) against a real server."""

from __future__ import annotations

import json
import signal
import socket
import time

import pytest
from conftest import read_all, start_server, wait_until, ws_url
from http_client import get, post
from tornado.websocket import websocket_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

TICKER = {"source_code": "import time\nfor i in range(8):\n    print('line', i, flush=True)\n    time.sleep(0.1)\n",
          "language_id": 71}


def events_only(messages: list[dict]) -> list[dict]:
    return [m for m in messages if m["type"] in ("status_update", "progress_update")]


def test_lines_arrive_live_before_the_end(live_server):
    # The program prints half its lines, then waits for a line of stdin that the test sends only once the
    # first chunk is here: the run is certainly still going (status 2) when that chunk arrives.
    src = ("for i in range(4):\n    print('line', i, flush=True)\ninput()\n"
           "for i in range(4, 8):\n    print('line', i, flush=True)\n")
    token = post(f"{live_server.api}/submissions", {"source_code": src, "language_id": 71,
                                                    "interactive": True}).json["token"]
    chunks = []
    with connect(ws_url(live_server, token)) as ws:
        first = json.loads(ws.recv(timeout=30))
        assert first["type"] == "connected" and first["message"] == f"Connected to submission {token}"
        while True:
            message = json.loads(ws.recv(timeout=60))
            for key in ("type", "timestamp", "token", "seq"):
                assert key in message
            if message.get("stream") == "stdout":
                chunks.append(message["text"])
                if len(chunks) == 1:  # the program waits for us, so it is still running
                    assert get(f"{live_server.api}/submissions/{token}").json["status"]["id"] == 2
                    ws.send(json.dumps({"type": "stdin", "data": "go\n", "eof": True}))
            if message["type"] == "status_update" and message["status"]["id"] >= 3:
                final = message
                break
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd.code == 1000
    assert final["status"] == {"id": 3, "name": "Accepted", "description": "Submission completed successfully"}
    assert len(chunks) >= 2
    assert "".join(chunks) == final["data"]["stdout"] == "".join(f"line {i}\n" for i in range(8))


def test_status_and_stage_sequence(live_server):
    token = post(f"{live_server.api}/submissions?wait=true&fields=token", TICKER).json["token"]
    with connect(ws_url(live_server, token)) as ws:
        messages = read_all(ws)
    assert messages[0]["type"] == "connected"
    evs = events_only(messages)
    assert [m["seq"] for m in evs] == list(range(1, len(evs) + 1))
    statuses = [m["status"]["id"] for m in evs if m["type"] == "status_update"]
    assert statuses == [1, 2, 3]
    stages = [m["stage"] for m in evs if m["type"] == "progress_update" and "stream" not in m]
    assert stages[0] == "queued" and stages[-1] == "finished" and "running" in stages
    assert evs[-1]["type"] == "status_update"  # the final status is the last event
    assert evs[-1]["data"]["stdout"] == "".join(f"line {i}\n" for i in range(8))
    assert float(evs[-1]["data"]["time"]) > 0


def test_replay_after_finish_equals_live_story(live_server):
    token = post(f"{live_server.api}/submissions", TICKER).json["token"]
    with connect(ws_url(live_server, token)) as ws:
        live = events_only(read_all(ws))
    with connect(ws_url(live_server, token)) as ws:
        replay = events_only(read_all(ws))
    assert replay == live


def test_two_clients_get_every_event_once_in_order(live_server):
    token = post(f"{live_server.api}/submissions", TICKER).json["token"]
    with connect(ws_url(live_server, token)) as a, connect(ws_url(live_server, token)) as b:
        from_a, from_b = events_only(read_all(a)), events_only(read_all(b))
    assert from_a == from_b
    assert len({m["seq"] for m in from_a}) == len(from_a)


def test_resume_with_since_has_no_duplicates(live_server):
    token = post(f"{live_server.api}/submissions", TICKER).json["token"]
    seen = []
    with connect(ws_url(live_server, token)) as ws:
        ws.recv(timeout=30)
        while len(seen) < 4:
            seen.append(json.loads(ws.recv(timeout=30)))
    last = seen[-1]["seq"]
    with connect(ws_url(live_server, token, f"?since={last}")) as ws:
        rest = read_all(ws)
    assert rest[0]["type"] == "connected" and rest[0]["seq"] == last
    rest = events_only(rest)
    assert rest[0]["seq"] == last + 1
    with connect(ws_url(live_server, token)) as ws:
        whole = events_only(read_all(ws))
    assert seen + rest == whole


def test_ping_pong_and_bad_messages_keep_the_socket_open(live_server):
    token = post(f"{live_server.api}/submissions", {"source_code": "import time; time.sleep(1)",
                                                    "language_id": 71}).json["token"]
    with connect(ws_url(live_server, token)) as ws:
        ws.send("this is not json")
        ws.send(json.dumps({"type": "dance"}))
        ws.send(json.dumps({"type": "ping"}))
        got = []
        while not any(m["type"] == "pong" for m in got):
            got.append(json.loads(ws.recv(timeout=30)))
        errors = [m for m in got if m["type"] == "error"]
        assert len(errors) == 2 and all(e["error"] and e["details"] for e in errors)
        pong = next(m for m in got if m["type"] == "pong")
        assert pong["token"] == token and "timestamp" in pong and "seq" in pong
        rest = read_all(ws)
    assert rest[-1]["type"] == "status_update" and rest[-1]["status"]["id"] == 3


def test_unknown_token_is_404_before_upgrade(live_server):
    with pytest.raises(InvalidStatus) as err:
        connect(ws_url(live_server, "no-such-token"))
    assert err.value.response.status_code == 404


def test_client_that_leaves_mid_run_does_not_stop_it(live_server):
    token = post(f"{live_server.api}/submissions", TICKER).json["token"]
    with connect(ws_url(live_server, token)) as ws:
        while json.loads(ws.recv(timeout=30)).get("stream") != "stdout":
            pass
    sub = wait_until(lambda: (s := get(f"{live_server.api}/submissions/{token}").json)["status"]["id"] >= 3 and s)
    assert sub["status"]["id"] == 3 and sub["stdout"].count("\n") == 8


def test_stderr_chunks_match_final_stderr(live_server):
    src = "import sys\nfor i in range(5):\n    print(i, file=sys.stderr, flush=True)\n    print(-i, flush=True)\n"
    token = post(f"{live_server.api}/submissions", {"source_code": src, "language_id": 71}).json["token"]
    with connect(ws_url(live_server, token)) as ws:
        messages = events_only(read_all(ws))
    final = messages[-1]["data"]
    for stream in ("stdout", "stderr"):
        assert "".join(m["text"] for m in messages if m.get("stream") == stream) == final[stream]


async def test_tornado_client_follows_a_run(live_server):
    token = post(f"{live_server.api}/submissions", TICKER).json["token"]
    conn = await websocket_connect(ws_url(live_server, token))
    messages = []
    while (raw := await conn.read_message()) is not None:
        messages.append(json.loads(raw))
    assert conn.close_code == 1000
    assert messages[0]["type"] == "connected" and messages[-1]["status"]["id"] == 3


@pytest.fixture(scope="module")
def tight_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("tight"), "--auth-token", "tok", env={
        "RUNFLARE_KERNEL_POOL": "{}", "RUNFLARE_WS_IDLE_TIMEOUT": "1", "RUNFLARE_WS_SEND_TIMEOUT": "1",
        "RUNFLARE_MAX_OUTPUT_SIZE": str(16 << 20)})
    yield server
    server.stop()


def test_token_as_query_parameter(tight_server):
    token = post(f"{tight_server.api}/submissions", {"source_code": "print(1)", "language_id": 71},
                 headers={"X-Auth-Token": "tok"}).json["token"]
    with pytest.raises(InvalidStatus) as err:
        connect(ws_url(tight_server, token))
    assert err.value.response.status_code == 401
    with connect(ws_url(tight_server, token, "?X-Auth-Token=tok")) as ws:
        assert read_all(ws)[-1]["status"]["id"] == 3


def test_idle_connection_is_closed(tight_server):
    # The program waits for stdin that only comes after the socket has been closed: whenever the idle
    # sweep runs, the run is still going, so the close can only be the idle one.
    auth = {"X-Auth-Token": "tok"}
    token = post(f"{tight_server.api}/submissions", {"source_code": "print(input())", "language_id": 71,
                                                      "interactive": True, "wall_time_limit": 20},
                 headers=auth).json["token"]
    with connect(ws_url(tight_server, token, "?X-Auth-Token=tok")) as ws:
        messages = read_all(ws)
    assert ws.close_code == 1000 and ws.close_reason == "idle"
    assert not any(m["type"] == "status_update" and m["status"]["id"] >= 3 for m in messages)
    assert get(f"{tight_server.api}/submissions/{token}", headers=auth).json["status"]["id"] == 2
    with connect(ws_url(tight_server, token, "?X-Auth-Token=tok")) as ws:  # let it finish
        ws.send(json.dumps({"type": "stdin", "data": "bye\n", "eof": True}))
        final = read_all(ws)[-1]
    assert final["status"]["id"] == 3 and final["data"]["stdout"] == "bye\n"


def test_slow_consumer_is_closed_with_1013_and_can_resume(tight_server):
    src = "import sys\nfor i in range(4000):\n    sys.stdout.write(str(i).rjust(10) * 400 + '\\n')\n    sys.stdout.flush()\n"
    token = post(f"{tight_server.api}/submissions", {"source_code": src, "language_id": 71},
                 headers={"X-Auth-Token": "tok"}).json["token"]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)  # so the server's buffers fill, not ours
    sock.connect(("127.0.0.1", tight_server.port))
    with connect(ws_url(tight_server, token, "?X-Auth-Token=tok"), sock=sock, max_size=None, max_queue=1) as ws:
        deadline = time.monotonic() + 120  # read nothing until the run has produced all ~16 MB (however busy)
        while time.monotonic() < deadline and get(f"{tight_server.api}/submissions/{token}",
                                                  headers={"X-Auth-Token": "tok"}).json["status"]["id"] < 3:
            time.sleep(0.5)
        time.sleep(2)  # and the server has had time to try to send it
        got = []
        try:
            while True:
                got.append(json.loads(ws.recv(timeout=30)))
        except ConnectionClosed:
            pass
        assert ws.close_code == 1013
    last = max(m["seq"] for m in got)
    with connect(ws_url(tight_server, token, f"?X-Auth-Token=tok&since={last}"), max_size=None) as ws:
        rest = events_only(read_all(ws))
    assert rest[0]["seq"] == last + 1 and rest[-1]["type"] == "status_update"


@pytest.mark.parametrize("language_id", [71, 1071])
def test_interactive_stdin_from_the_socket(live_server, language_id):
    src = "name = input('name? ')\nprint('hello', name)\nprint('again', input())\n"
    token = post(f"{live_server.api}/submissions", {"source_code": src, "language_id": language_id,
                                                    "interactive": True}).json["token"]
    with connect(ws_url(live_server, token)) as ws:
        while json.loads(ws.recv(timeout=30)).get("stage") != "running":
            pass
        ws.send(json.dumps({"type": "stdin", "data": "bob\n"}))
        ws.send(json.dumps({"type": "stdin", "data": "twice\n", "eof": True}))
        messages = read_all(ws)
    final = messages[-1]
    assert final["status"]["id"] == 3, final
    assert "hello bob\n" in final["data"]["stdout"] and "again twice\n" in final["data"]["stdout"]


def test_interactive_eof_is_a_terminal_eof(live_server):
    src = "import sys\ndata = sys.stdin.read()\nprint(len(data.split()))\n"
    token = post(f"{live_server.api}/submissions", {"source_code": src, "language_id": 71,
                                                    "interactive": True}).json["token"]
    with connect(ws_url(live_server, token)) as ws:
        ws.send(json.dumps({"type": "stdin", "data": "a b c\nd\n"}))
        ws.send(json.dumps({"type": "stdin", "eof": True}))
        final = read_all(ws)[-1]
    assert final["data"]["stdout"] == "4\n"


def test_interactive_run_still_obeys_wall_limit(live_server):
    token = post(f"{live_server.api}/submissions", {"source_code": "input()", "language_id": 71,
                                                    "interactive": True, "wall_time_limit": 1}).json["token"]
    with connect(ws_url(live_server, token)) as ws:
        final = read_all(ws)[-1]
    assert final["status"]["id"] == 5


def test_stdin_to_a_non_interactive_run_is_an_error(live_server):
    token = post(f"{live_server.api}/submissions", {"source_code": "import time; time.sleep(1)",
                                                    "language_id": 71}).json["token"]
    with connect(ws_url(live_server, token)) as ws:
        ws.send(json.dumps({"type": "stdin", "data": "x"}))
        messages = []
        while not any(m["type"] == "error" for m in messages):
            messages.append(json.loads(ws.recv(timeout=30)))
        assert "interactive" in messages[-1]["details"]
        assert read_all(ws)[-1]["status"]["id"] == 3  # the socket stayed open to the end


def test_socket_wait_and_polling_agree(live_server):
    src = "import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(2)\n"
    body = {"source_code": src, "language_id": 71}
    waited = post(f"{live_server.api}/submissions?wait=true&fields=token,stdout,stderr,status,exit_code,time", body).json
    with connect(ws_url(live_server, waited["token"])) as ws:
        final = read_all(ws)[-1]
    polled = get(f"{live_server.api}/submissions/{waited['token']}?fields=stdout,stderr,status,exit_code,time").json
    assert final["status"]["id"] == waited["status"]["id"] == polled["status"]["id"] == 11
    for key in ("stdout", "stderr", "exit_code", "time"):
        assert final["data"][key] == waited[key] == polled[key]


def test_server_shutdown_closes_sockets_with_1001(tmp_path):
    """SIGTERM: the server drains (up to its drain timeout), then closes every socket with 1001 (going away);
    a run that outlasts the drain is left to re-queue on the next start."""
    server = start_server(tmp_path, env={"RUNFLARE_KERNEL_POOL": "{}", "RUNFLARE_MAX_WALL_TIME_LIMIT": "120"})
    try:
        token = post(f"{server.api}/submissions", {"source_code": "input()", "language_id": 71,
                                                   "interactive": True, "wall_time_limit": 120}).json["token"]
        with connect(ws_url(server, token)) as ws:
            while json.loads(ws.recv(timeout=60)).get("stage") != "running":
                pass
            server.process.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed):
                while True:
                    ws.recv(timeout=90)
        assert ws.close_code == 1001, (ws.close_code, ws.close_reason)
        assert server.process.wait(60) == 0
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pinging_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("pinging"), env={
        "RUNFLARE_KERNEL_POOL": "{}", "RUNFLARE_WS_PING_INTERVAL": "0.5"})
    yield server
    server.stop()


def raw_upgrade(server, token: str) -> socket.socket:
    """A WebSocket handshake by hand, from a client that will never answer a ping."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall((f"GET /api/v1/submissions/{token}/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101")
    return sock


def test_a_client_that_never_answers_pings_is_closed_and_one_that_does_is_kept(pinging_server):
    token = post(f"{pinging_server.api}/submissions", {"source_code": "print(input())", "language_id": 71,
                                                       "interactive": True, "wall_time_limit": 20}).json["token"]
    silent = raw_upgrade(pinging_server, token)
    with connect(ws_url(pinging_server, token)) as answering:  # the client library answers pings itself
        answering.recv(timeout=10)  # connected
        frames = b""
        silent.settimeout(60)
        while chunk := silent.recv(4096):  # pings, then a close frame, then the server hangs up
            frames += chunk
        assert b"\x89" in frames  # an unanswered ping (opcode 9)
        assert b"\x88" in frames and b"no answer to pings" in frames  # the close frame and its reason
        # The answering client lived as long, and still gets its run's end.
        answering.send(json.dumps({"type": "stdin", "data": "still here\n", "eof": True}))
        final = [m for m in read_all(answering) if m["type"] == "status_update"][-1]
    assert final["status"]["id"] == 3 and final["data"]["stdout"] == "still here\n"
    silent.close()


def test_stdin_sent_right_before_closing_still_reaches_the_program(live_server):
    token = post(f"{live_server.api}/submissions", {"source_code": "print(input()[::-1])", "language_id": 71,
                                                    "interactive": True}).json["token"]
    with connect(ws_url(live_server, token)) as ws:
        ws.recv(timeout=30)  # connected
        ws.send(json.dumps({"type": "stdin", "data": "olleh\n", "eof": True}))
    sub = wait_until(lambda: (s := get(f"{live_server.api}/submissions/{token}").json)["status"]["id"] >= 3 and s)
    assert sub["status"]["id"] == 3 and sub["stdout"] == "hello\n"


def test_a_socket_gets_its_stdin_inbox_on_its_first_stdin_message(live_server):
    """A socket holds stdin state only once it sends stdin: its first message (a bad one here) makes it, the
    ones after it reach the program in order; a socket beside it that never sends stdin follows the run to
    its end and is closed with 1000."""
    token = post(f"{live_server.api}/submissions", {"source_code": "print(input())\nprint(input())\n",
                                                    "language_id": 71, "interactive": True}).json["token"]
    with connect(ws_url(live_server, token)) as idle, connect(ws_url(live_server, token)) as feeding:
        assert json.loads(idle.recv(timeout=30))["type"] == "connected"
        assert json.loads(feeding.recv(timeout=30))["type"] == "connected"
        feeding.send(json.dumps({"type": "stdin", "data": 5}))
        got = []
        while not any(m["type"] == "error" for m in got):
            got.append(json.loads(feeding.recv(timeout=30)))
        assert got[-1]["error"] == "bad stdin" and "string" in got[-1]["details"]
        feeding.send(json.dumps({"type": "stdin", "data": "one\n"}))
        feeding.send(json.dumps({"type": "stdin", "data": "two\n", "eof": True}))
        fed = read_all(feeding)
        followed = read_all(idle)
    assert feeding.close_code == idle.close_code == 1000
    assert not any(m["type"] == "error" for m in fed + followed)
    finals = [[m for m in messages if m["type"] == "status_update"][-1] for messages in (fed, followed)]
    assert all(f["status"]["id"] == 3 and f["data"]["stdout"] == "one\ntwo\n" for f in finals)


def test_stdin_beyond_what_the_server_holds_closes_the_socket_1008(tmp_path):
    server = start_server(tmp_path, env={"RUNFLARE_KERNEL_POOL": "{}", "RUNFLARE_MAX_STDIN_SIZE": "1000"})
    try:
        token = post(f"{server.api}/submissions", {"source_code": "print(input())", "language_id": 71,
                                                   "interactive": True}).json["token"]
        with connect(ws_url(server, token)) as ws:
            ws.recv(timeout=30)  # connected
            ws.send(json.dumps({"type": "stdin", "data": "x" * 2000}))
            read_all(ws)
        assert ws.close_code == 1008 and "too much stdin" in ws.close_reason
        with connect(ws_url(server, token)) as ws:  # the run goes on; another socket can still feed it
            ws.send(json.dumps({"type": "stdin", "data": "fits\n", "eof": True}))
            final = [m for m in read_all(ws) if m["type"] == "status_update"][-1]
        assert final["status"]["id"] == 3 and final["data"]["stdout"] == "fits\n"
    finally:
        server.stop()


def test_events_of_every_frame_length_reach_a_strict_client(live_server):
    """Events are written as frames built once for every client: 7-bit, 16-bit and 64-bit payload lengths
    (RFC 6455 5.2), non-ASCII text included, parse in the `websockets` client and carry the program's output."""
    src = ("import sys\nfor n in (10, 300, 70000):\n    sys.stdout.write('é' * n + '\\n'); sys.stdout.flush()\n"
           "    __import__('time').sleep(0.3)\n")
    token = post(f"{live_server.api}/submissions", {"source_code": src, "language_id": 71}).json["token"]
    with connect(ws_url(live_server, token), max_size=None) as ws:
        messages = events_only(read_all(ws))
    streamed = "".join(m["text"] for m in messages if m.get("stream") == "stdout")
    assert streamed == "".join("é" * n + "\n" for n in (10, 300, 70000))
    assert messages[-1]["data"]["stdout"] == streamed
    sizes = [len(json.dumps(m)) for m in messages if m.get("stream") == "stdout"]
    assert min(sizes) < 1 << 16 < max(sizes)  # 16- and 64-bit lengths on the wire


@pytest.mark.parametrize("n", [0, 1, 125, 126, 127, 65535, 65536, 200_000])
def test_an_event_frame_is_the_frame_an_independent_implementation_makes(n):
    from websockets.frames import Frame, Opcode

    from runflare_server.broker.memory import LoggedEvent, text_frame

    text = ("é" * n)[:n] if n % 2 else "a" * n
    assert text_frame(text) == Frame(Opcode.TEXT, text.encode()).serialize(mask=False, extensions=[])
    event = LoggedEvent({"type": "progress_update", "text": text})
    assert event.frame == text_frame(event.raw) and event.frame is event.frame  # built once


async def test_the_shared_key_names_are_the_attributes_tornado_gives_an_open_socket():
    """SubmissionSocket enters TORNADO_ATTRIBUTES in its instances' shared dict keys before any exists; they
    must be what this tornado sets on an open WebSocketHandler (its own state is in slots)."""
    import asyncio

    from tornado import web
    from tornado import websocket as tornado_ws
    from tornado.httpserver import HTTPServer
    from tornado.testing import bind_unused_port

    from runflare_server.api.websocket import TORNADO_ATTRIBUTES, SubmissionSocket

    seen: asyncio.Future = asyncio.get_running_loop().create_future()

    class Plain(tornado_ws.WebSocketHandler):
        def open(self, *args: str) -> None:
            seen.set_result(list(vars(self)))

    sock, port = bind_unused_port()
    server = HTTPServer(web.Application([(r"/(x)/ws", Plain)]))
    server.add_sockets([sock])
    try:
        conn = await websocket_connect(f"ws://127.0.0.1:{port}/x/ws")
        assert sorted(await asyncio.wait_for(seen, 30)) == sorted(TORNADO_ATTRIBUTES)
        conn.close()
    finally:
        server.stop()
    assert not set(SubmissionSocket.__slots__) & set(TORNADO_ATTRIBUTES)
