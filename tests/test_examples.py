"""The examples against a live server: the Python client (socket and polling), the curl + websockets-CLI
script, and the Deno TypeScript client (type check, streaming, exit codes, resume after a dropped
connection, polling fallback when the socket cannot open)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TS_CLIENT = EXAMPLES / "websocket-client.ts"

LINES = [f"line {i}" for i in range(1, 9)]
SLOW_PROGRAM = "import time\nfor i in range(1, 9):\n    print(f'line {i}', flush=True)\n    time.sleep(0.25)\n"
FAILING_PROGRAM = "import sys\nprint('before')\nsys.exit(3)\n"


def deno_bin() -> str:
    found = shutil.which("deno")
    if found:
        return found
    try:
        import deno  # the pip package ships the binary
    except ImportError:
        pytest.skip("deno is not installed (pip install deno)")
    return deno.find_deno_bin()


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("programs")
    files = {"slow": d / "slow.py", "failing": d / "failing.py"}
    files["slow"].write_text(SLOW_PROGRAM)
    files["failing"].write_text(FAILING_PROGRAM)
    return files


@pytest.fixture(scope="module")
def python_id(live_server) -> str:
    """Python's language id on this server: the program run (71) when listed, else the kernel run (1071)."""
    with urllib.request.urlopen(live_server.api + "/languages", timeout=10) as r:
        ids = {lang["id"] for lang in json.load(r)}
    for candidate in (71, 1071):
        if candidate in ids:
            return str(candidate)
    pytest.skip(f"no Python language on this server: {sorted(ids)}")


def env_for(url: str) -> dict[str, str]:
    return {**os.environ, "RUNFLARE_URL": url, "NO_COLOR": "1"}


def run_python_client(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(EXAMPLES / "python_client.py"), *args], env=env_for(url),
                          capture_output=True, text=True, timeout=120)


def deno_run(url: str, *args: str) -> list[str]:
    return [deno_bin(), "run", "--allow-net", "--allow-env", "--allow-read", str(TS_CLIENT), *args]


# ---- a TCP proxy that the tests can cut, or that refuses WebSocket upgrades ----------------

class Proxy:
    """Forwards 127.0.0.1:port to the server. cut() drops every open connection without a close
    frame (a network failure, as the client sees it); refuse_ws answers WebSocket requests 503."""

    def __init__(self, upstream_port: int, refuse_ws: bool = False) -> None:
        self.upstream_port = upstream_port
        self.refuse_ws = refuse_ws
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.ws_requests = 0
        self.lock = threading.Lock()
        threading.Thread(target=self.accept_loop, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def accept_loop(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(client,), daemon=True).start()

    def serve(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(65536)
            if not chunk:
                client.close()
                return
            head += chunk
        request_line = head.split(b"\r\n", 1)[0]
        if b"/ws" in request_line:
            with self.lock:
                self.ws_requests += 1
            if self.refuse_ws:
                client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                client.close()
                return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        with self.lock:
            self.conns += [client, upstream]
        upstream.sendall(head)
        threading.Thread(target=self.pump, args=(upstream, client), daemon=True).start()
        self.pump(client, upstream)

    @staticmethod
    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()
        self.cut()


@pytest.fixture
def proxy_factory(live_server) -> Iterator:
    made: list[Proxy] = []

    def make(**kwargs) -> Proxy:
        made.append(Proxy(live_server.port, **kwargs))
        return made[-1]

    yield make
    for p in made:
        p.close()


# ---- python_client.py ----------------------------------------------------------------------

def test_python_client_prints_websocket_messages_as_they_arrive(live_server, programs, python_id) -> None:
    proc = run_python_client(live_server.url, str(programs["slow"]), "--language", python_id)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert "token" in lines[0]
    messages = lines[1:]
    assert messages[0]["type"] == "connected"
    assert messages[0]["message"] == f"Connected to submission {lines[0]['token']}"
    events = [m for m in messages if m["type"] in ("status_update", "progress_update")]
    seqs = [m["seq"] for m in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    streamed = "".join(m["text"] for m in events if m.get("stream") == "stdout")
    assert streamed.splitlines() == LINES
    statuses = [m["status"]["id"] for m in events if m["type"] == "status_update"]
    assert statuses[-1] == 3 and messages[-1]["type"] == "status_update"
    assert messages[-1]["status"]["name"] == "Accepted"
    # Output chunks arrive before the final status, not bundled with it.
    first_chunk = next(i for i, m in enumerate(messages) if m.get("stream") == "stdout")
    assert first_chunk < len(messages) - 1


def test_python_client_polling(live_server, programs, python_id) -> None:
    proc = run_python_client(live_server.url, str(programs["slow"]), "--poll", "--language", python_id)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    final = lines[-1]
    assert final["status"] == {"id": 3, "description": "Accepted"}
    assert final["stdout"].splitlines() == LINES
    assert all(line["status"]["id"] <= 2 for line in lines[1:-1])


def test_python_client_exit_code_is_the_status(live_server, python_id) -> None:
    proc = run_python_client(live_server.url, "--code", FAILING_PROGRAM, "--language", python_id)
    assert proc.returncode == 11, proc.stdout + proc.stderr  # Runtime Error (NZEC)
    assert json.loads(proc.stdout.splitlines()[-1])["status"]["id"] == 11


# ---- curl + websocat / websockets CLI ------------------------------------------------------

def test_curl_and_websocket_cli_flow(live_server, programs, python_id) -> None:
    if not shutil.which("curl"):
        pytest.skip("curl is not installed (apt-get install curl)")
    env = {**env_for(live_server.url), "PYTHON": sys.executable}
    proc = subprocess.Popen(["bash", str(EXAMPLES / "curl-websocat.sh"), str(programs["slow"]), python_id],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out + err
    messages = [json.loads(line[2:]) for line in out.splitlines() if line.startswith("< ")]
    assert messages[0]["type"] == "connected"
    assert messages[-1]["type"] == "status_update" and messages[-1]["status"]["name"] == "Accepted"
    assert "".join(m["text"] for m in messages if m.get("stream") == "stdout").splitlines() == LINES
    assert "Connection closed: 1000" in out
    result = json.loads(out.split("result:", 1)[1].strip())
    assert result["status"]["id"] == 3 and result["stdout"].splitlines() == LINES
    # The helper that kept the CLI's stdin open is gone with the script.
    leftovers = [p for p in psutil.process_iter(["pid", "status"])
                 if _session_of(p.pid) == proc.pid and p.info["status"] != psutil.STATUS_ZOMBIE]
    assert leftovers == []


def _session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


# ---- websocket-client.ts -------------------------------------------------------------------

def test_typescript_client_type_checks() -> None:
    proc = subprocess.run([deno_bin(), "check", str(TS_CLIENT)], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "NO_COLOR": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_typescript_client_streams_and_exits_with_status(live_server, programs, python_id) -> None:
    proc = subprocess.run(deno_run(live_server.url, str(programs["slow"]), "--verbose", "--language", python_id),
                          env=env_for(live_server.url), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == LINES
    assert "[runflare] status: Accepted" in proc.stderr
    assert "[runflare] pong" in proc.stderr
    assert re.search(r"final: 3 Accepted time=[0-9.]+s memory=\d+KB via=websocket", proc.stderr), proc.stderr

    failing = subprocess.run(deno_run(live_server.url, str(programs["failing"]), "--language", python_id),
                             env=env_for(live_server.url), capture_output=True, text=True, timeout=120)
    assert failing.returncode == 11, failing.stderr
    assert failing.stdout == "before\n"


def test_typescript_client_resumes_after_a_dropped_connection(live_server, programs, python_id,
                                                             proxy_factory) -> None:
    proxy = proxy_factory()
    proc = subprocess.Popen(deno_run(proxy.url, str(programs["slow"]), "--language", python_id), env=env_for(proxy.url),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert first == "line 1\n"
        proxy.cut()  # the socket dies mid-run, without a close frame
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert (first + rest).splitlines() == LINES  # every line exactly once, in order
    resumed = re.search(r"reconnecting \(attempt 1\) in \d+ ms, since=(\d+)", err)
    assert resumed and int(resumed.group(1)) > 0, err
    assert proxy.ws_requests >= 2
    assert "via=websocket reconnects=1" in err


def test_typescript_client_polls_when_the_socket_cannot_open(live_server, programs, python_id,
                                                            proxy_factory) -> None:
    proxy = proxy_factory(refuse_ws=True)
    proc = subprocess.run(deno_run(proxy.url, str(programs["slow"]), "--retries", "1", "--language", python_id),
                          env=env_for(proxy.url), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == LINES
    assert "websocket unavailable" in proc.stderr and "via=polling" in proc.stderr
    assert proxy.ws_requests == 2


def test_typescript_client_interactive_stdin(live_server, python_id, tmp_path) -> None:
    program = tmp_path / "greet.py"
    program.write_text("name = input()\nprint('hi', name, flush=True)\nprint(input().upper())\n")
    proc = subprocess.Popen(deno_run(live_server.url, str(program), "--interactive", "--language", python_id),
                            env=env_for(live_server.url), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        proc.stdin.write("bob\n")
        proc.stdin.flush()
        # The program answers the first line while the second has not been typed yet.
        assert proc.stdout.readline() == "hi bob\n"
        proc.stdin.write("second\n")
        proc.stdin.close()
        rest = proc.stdout.read()
        err = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert rest == "SECOND\n"


def test_typescript_client_shows_rich_displays(live_server, tmp_path) -> None:
    with urllib.request.urlopen(live_server.api + "/languages", timeout=10) as r:
        if 1071 not in {lang["id"] for lang in json.load(r)}:
            pytest.skip("this server has no IPython kernel runs (language 1071)")
    program = tmp_path / "rich.py"
    program.write_text("from IPython.display import HTML, display\ndisplay(HTML('<b>hi</b>'))\nprint('after')\n")
    proc = subprocess.run(deno_run(live_server.url, str(program), "--language", "1071"),
                          env=env_for(live_server.url), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "[runflare] display: text/html, text/plain" in proc.stderr or \
        "[runflare] display: text/plain, text/html" in proc.stderr, proc.stderr
    assert proc.stdout.splitlines() == ["<IPython.core.display.HTML object>", "after"]


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A server that wants X-Auth-Token on every route (conftest's start_server polls /health without one)."""
    from conftest import LiveServer, free_port, wait_until

    data_dir = tmp_path_factory.mktemp("auth-server")
    port = free_port()
    log = open(data_dir / "server.log", "ab")  # noqa: SIM115 - closed after the server stops
    proc = subprocess.Popen([sys.executable, "-m", "runflare_server", "serve", "--host", "127.0.0.1", "--port",
                             str(port), "--data-dir", str(data_dir)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "RUNFLARE_AUTH_TOKENS": '["s3cret"]'}, start_new_session=True)
    server = LiveServer(f"http://127.0.0.1:{port}", port, data_dir, proc)
    def answering() -> bool:
        if proc.poll() is not None:
            raise AssertionError("auth server exited: " + (data_dir / "server.log").read_text()[-2000:])
        try:
            with urllib.request.urlopen(urllib.request.Request(server.api + "/health",
                                                               headers={"X-Auth-Token": "s3cret"}), timeout=2):
                return True
        except OSError:
            return False

    try:
        wait_until(answering, interval=0.2, message="the auth server answers /health")
    except BaseException:
        server.stop()
        log.close()
        raise
    yield server
    server.stop()
    log.close()


def test_clients_send_the_auth_token(auth_server, programs, tmp_path) -> None:
    program = tmp_path / "hi.py"
    program.write_text("print('hi')\n")
    env = {**env_for(auth_server.url), "RUNFLARE_AUTH_TOKEN": "s3cret"}
    ts = subprocess.run(deno_run(auth_server.url, str(program)), env=env, capture_output=True, text=True, timeout=120)
    py = subprocess.run([sys.executable, str(EXAMPLES / "python_client.py"), str(program)], env=env,
                        capture_output=True, text=True, timeout=120)
    assert ts.returncode == 0 and ts.stdout == "hi\n", ts.stderr
    assert "via=websocket" in ts.stderr  # the socket took the token as a query parameter
    assert py.returncode == 0, py.stderr
    assert json.loads(py.stdout.splitlines()[1])["type"] == "connected"

    refused = run_python_client(auth_server.url, str(program))  # no token
    assert refused.returncode == 1 and "HTTP 401" in refused.stderr
