"""runflare_nb.Client / AsyncClient against a real server, including the polling fallback
(through a real TCP proxy that refuses or cuts the WebSocket)."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
from conftest import free_port, start_server

from runflare_nb import AsyncClient, Client, NotFound, ServerUnreachable, ValidationError
from runflare_nb.errors import AuthError, UnknownLanguage
from runflare_nb.languages import ALIASES, guess_from_filename, resolve

SLOW_TWO_LINES = "import time\nprint('a', flush=True)\ntime.sleep(2)\nprint('b')\n"


@pytest.fixture(scope="module")
def client(live_server) -> Client:
    return Client(live_server.url)


@pytest.fixture(scope="module")
def python_id(client: Client) -> int:
    """Python 3 as a program run (71) when the server has it, else as a kernel run (1071)."""
    ids = {lang["id"] for lang in client.languages()}
    return 71 if 71 in ids else 1071


class FlakyProxy:
    """A TCP proxy in front of the live server. Plain HTTP passes through. WebSocket upgrades are
    answered 502 (mode "refuse"), or the first one is cut without a close frame ``cut_after``
    seconds after it opened (mode "drop")."""

    def __init__(self, upstream_port: int, mode: str, cut_after: float = 1.0) -> None:
        self.upstream_port = upstream_port
        self.mode = mode
        self.cut_after = cut_after
        self.ws_requests: list[str] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self._sockets.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(65536)
            if not chunk:
                conn.close()
                return
            head += chunk
        is_ws = b"upgrade: websocket" in head.lower()
        if is_ws:
            self.ws_requests.append(head.split(b"\r\n", 1)[0].decode())
        if is_ws and self.mode == "refuse":
            conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            conn.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        self._sockets.append(upstream)
        upstream.sendall(head)
        if is_ws and self.mode == "drop" and len(self.ws_requests) == 1:
            threading.Timer(self.cut_after, self._cut, args=(conn, upstream)).start()
        threading.Thread(target=self._pump, args=(upstream, conn), daemon=True).start()
        self._pump(conn, upstream)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @staticmethod
    def _cut(*socks: socket.socket) -> None:
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.server.close()
        for sock in self._sockets:
            sock.close()


def stdout_of(events: list[dict]) -> str:
    return "".join(e.get("text", "") for e in events if e.get("stream") == "stdout")


def assert_no_duplicates(events: list[dict]) -> None:
    seqs = [e["seq"] for e in events if e["type"] != "connected" and e.get("seq") is not None]
    assert seqs == sorted(set(seqs)), seqs
    assert sum(e["type"] == "connected" for e in events) <= 1


def test_language_resolution_by_alias_extension_id_and_server_name(client: Client) -> None:
    assert [resolve(n) for n in ("python", "py", "python3", "c++", "cpp", "js", "node", "ts", "c")] == \
        [71, 71, 71, 54, 54, 63, 63, 74, 50]
    assert [resolve(n) for n in ("java", "rust", "go", "ruby", "perl", "bash", "sh", "sql")] == \
        [62, 73, 60, 72, 85, 46, 46, 82]
    assert resolve(" 1071 ") == 1071 and resolve(54) == 54
    assert guess_from_filename("a/b/main.rs") == 73 and guess_from_filename("x.CPP") == 54
    assert guess_from_filename("notes.txt") is None
    for lang in client.languages():  # a server name, exact or without its version, resolves to its id
        assert client.language_id(lang["name"]) == lang["id"]
        base = lang["name"].split(" (")[0]
        unique = sum(other["name"].split(" (")[0] == base for other in client.languages()) == 1
        if unique and base.lower() not in ALIASES:  # aliases ("bash") win over server names
            assert client.language_id(base) == lang["id"]
    with pytest.raises(UnknownLanguage):
        client.language_id("no such language at all")


def test_submit_wait_get(client: Client, python_id: int) -> None:
    token = client.submit("name = input()\nprint('hello', name)", python_id, stdin="world\n")
    assert isinstance(token, str) and len(token) >= 32
    result = client.wait(token, timeout=60)
    assert result["token"] == token
    assert result["status"]["id"] == 3, result
    assert result["stdout"] == "hello world\n"
    assert result["exit_code"] == 0
    assert result["time"] is not None and result["memory"] is not None
    assert client.get(token, ["stdout", "status"]) == {"stdout": "hello world\n", "status": result["status"]}


def test_submit_wait_true_and_expected_output(client: Client, python_id: int) -> None:
    right = client.submit("print(6 * 7)", python_id, expected_output="42", wait=True)
    assert right["status"]["id"] == 3 and right["stdout"] == "42\n"
    wrong = client.submit("print(6 * 7)", python_id, expected_output="41", wait=True)
    assert wrong["status"]["description"] == "Wrong Answer"
    failing = client.run("raise SystemExit(3)", python_id)
    assert failing["status"]["id"] == 11 and failing["exit_code"] == 3


def test_non_utf8_output_arrives_decoded(client: Client, python_id: int) -> None:
    result = client.run("import os\nos.write(1, b'ok \\xff\\n')", python_id)
    assert result["status"]["id"] == 3
    assert result["stdout"].startswith("ok ") and "\ufffd" in result["stdout"]


def test_stream_over_the_socket(client: Client, python_id: int) -> None:
    token = client.submit(SLOW_TWO_LINES.replace("sleep(2)", "sleep(0.3)"), python_id)
    events = list(client.stream(token, timeout=60))
    assert events[0]["type"] == "connected"
    assert all(e.get("source") is None for e in events), "everything came from the socket"
    assert_no_duplicates(events)
    assert stdout_of(events) == "a\nb\n"
    statuses = [e["status"]["id"] for e in events if e["type"] == "status_update"]
    assert statuses[-1] == 3 and statuses == sorted(statuses)
    stages = [e["stage"] for e in events if e["type"] == "progress_update" and "message" in e]
    assert "running" in stages
    # A late joiner that has seen everything up to seq N gets only the rest.
    middle = events[len(events) // 2]["seq"]
    rest = list(client.stream(token, since=middle))
    assert [e["seq"] for e in rest if e["type"] != "connected"] == [e["seq"] for e in events if e["seq"] > middle]


def test_stream_falls_back_to_polling_when_the_socket_is_refused(live_server, python_id: int) -> None:
    proxy = FlakyProxy(live_server.port, "refuse")
    try:
        client = Client(proxy.url)
        token = client.submit(SLOW_TWO_LINES.replace("sleep(2)", "sleep(0.3)"), python_id)
        events = list(client.stream(token, timeout=60))
    finally:
        proxy.close()
    assert proxy.ws_requests, "the client tried the socket first"
    assert events and all(e["source"] == "poll" for e in events)
    assert stdout_of(events) == "a\nb\n"
    finals = [e for e in events if e["type"] == "status_update" and e["status"]["id"] >= 3]
    assert len(finals) == 1 and finals[0] is events[-1] and finals[0]["status"]["name"] == "Accepted"
    ids = [e["status"]["id"] for e in events if e["type"] == "status_update"]
    assert len(ids) == len(set(ids)), "a status is reported once"


def test_stream_resumes_with_since_after_a_drop(live_server, python_id: int) -> None:
    proxy = FlakyProxy(live_server.port, "drop", cut_after=1.0)
    try:
        client = Client(proxy.url)
        token = client.submit(SLOW_TWO_LINES, python_id)
        events = list(client.stream(token, timeout=60))
    finally:
        proxy.close()
    assert len(proxy.ws_requests) >= 2, proxy.ws_requests
    assert "since=" in proxy.ws_requests[1]
    assert_no_duplicates(events)
    assert stdout_of(events) == "a\nb\n"
    assert events[-1]["type"] == "status_update" and events[-1]["status"]["id"] == 3


def test_interactive_stdin_over_the_socket(client: Client, python_id: int) -> None:
    source = "import sys\nprint('got', input(), flush=True)\nprint('then', input())\nprint(repr(sys.stdin.read()))\n"
    token = client.submit(source, python_id, interactive=True)
    events = []
    for event in client.stream(token, timeout=60):
        events.append(event)
        if event.get("type") == "progress_update" and event.get("stage") == "running" and "message" in event:
            client.send_stdin(token, "one\n")  # through the stream's own socket
        if event.get("text", "").startswith("got"):
            client.send_stdin(token, "two\nrest", eof=True)
    assert not [e for e in events if e["type"] == "error"], events
    assert stdout_of(events).startswith("got one\nthen two\n'rest")
    assert events[-1]["status"]["id"] == 3


def test_validation_errors_carry_field_messages(client: Client, python_id: int) -> None:
    with pytest.raises(ValidationError) as info:
        client.submit("print(1)", 999_999)
    assert info.value.status == 422
    assert "language_id" in info.value.errors and info.value.errors["language_id"]
    assert "language_id" in str(info.value)
    with pytest.raises(ValidationError) as info:
        client.submit("print(1)", python_id, cpu_time_limit=1000)
    assert list(info.value.errors) == ["cpu_time_limit"]


def test_unknown_token_and_unreachable_server(client: Client) -> None:
    with pytest.raises(NotFound):
        client.get("0" * 32)
    with pytest.raises(NotFound):
        list(client.stream("0" * 32))
    dead = Client(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ServerUnreachable):
        dead.submit("print(1)", 71)


def test_async_client(live_server, python_id: int) -> None:
    async def scenario() -> tuple[dict, list[dict], dict]:
        client = AsyncClient(live_server.url)
        assert any(lang["id"] == python_id for lang in await client.languages())
        token = await client.submit("print('async')", "python" if python_id == 71 else python_id)
        events = [event async for event in client.stream(token, timeout=60)]
        waited = await client.wait(token)
        try:
            await client.submit("x", 999_999)
        except ValidationError as exc:
            errors = exc.errors
        return waited, events, errors

    result, events, errors = asyncio.run(scenario())
    assert result["status"]["id"] == 3 and result["stdout"] == "async\n"
    assert events[0]["type"] == "connected" and events[-1]["status"]["id"] == 3
    assert_no_duplicates(events)
    assert "language_id" in errors


def test_async_client_polls_when_the_socket_is_refused(live_server, python_id: int) -> None:
    proxy = FlakyProxy(live_server.port, "refuse")

    async def scenario() -> list[dict]:
        client = AsyncClient(proxy.url)
        token = await client.submit("print('polled')", python_id)
        return [event async for event in client.stream(token, timeout=60)]

    try:
        events = asyncio.run(scenario())
    finally:
        proxy.close()
    assert proxy.ws_requests and all(e["source"] == "poll" for e in events)
    assert stdout_of(events) == "polled\n" and events[-1]["status"]["id"] == 3


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A second real server with auth on (the shared helper sends the token with its /health probe)."""
    server = start_server(tmp_path_factory.mktemp("auth-server"), "--auth-token", "s3cret")
    yield server
    server.stop()


def test_auth_token_header(auth_server, python_id: int) -> None:
    with pytest.raises(AuthError) as info:
        Client(auth_server.url).languages()
    assert info.value.status == 401
    client = Client(auth_server.url, token="s3cret")
    token = client.submit("print('authorised')", python_id)
    events = list(client.stream(token, timeout=60))
    assert events[0]["type"] == "connected", "the socket accepted the X-Auth-Token header"
    assert client.get(token)["stdout"] == "authorised\n"
