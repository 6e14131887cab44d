"""The Jupyter Server extension (extension/runflare_jupyter): a real `jupyter server` with the extension mounts
Run-Flare's REST and WebSocket API under {base_url}/runflare/api/v1 behind Jupyter Server's own auth, and gives
its kernels what %runflare needs to find it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import die_with_parent, free_port, wait_until
from http_client import call, get, post
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

pytest.importorskip("jupyter_server")

ROOT = Path(__file__).resolve().parent.parent
EXTENSION_DIR = ROOT / "extension"
TOKEN = "test-token-" + uuid.uuid4().hex
BASE_URL = "/jp/"  # a non-root base_url, so the prefix is certainly {base_url}/runflare

pytestmark = pytest.mark.timeout(120)


@dataclass
class Jupyter:
    url: str  # http://127.0.0.1:PORT/jp
    env: dict[str, str]
    root: Path

    @property
    def api(self) -> str:
        return self.url + "/runflare/api/v1"


def jupyter_env(root: Path) -> dict[str, str]:
    """The extension importable from the source tree, Jupyter's config and data dirs private to the test."""
    env = {**os.environ}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(EXTENSION_DIR), env.get("PYTHONPATH", "")) if p)
    env["JUPYTER_CONFIG_DIR"] = str(root / "config")
    env["JUPYTER_RUNTIME_DIR"] = str(root / "runtime")
    env["RUNFLARE_DATA_DIR"] = str(root / "runflare")
    env["RUNFLARE_KERNEL_POOL"] = "{}"
    for name in ("RUNFLARE_URL", "RUNFLARE_AUTH_TOKEN", "RUNFLARE_TOKEN", "JUPYTERHUB_API_TOKEN"):
        env.pop(name, None)
    (root / "config").mkdir(parents=True, exist_ok=True)
    return env


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jupyter]:
    root = tmp_path_factory.mktemp("jupyter-ext")
    env = jupyter_env(root)
    port = free_port()
    log = open(root / "server.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root", "--ip=127.0.0.1",
         f"--port={port}", "--ServerApp.port_retries=0", f"--ServerApp.base_url={BASE_URL}",
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
         '--ServerApp.jpserver_extensions={"runflare_jupyter": True}'],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True,
        preexec_fn=die_with_parent,
    )
    server = Jupyter(f"http://127.0.0.1:{port}{BASE_URL.rstrip('/')}", env, root)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError("jupyter server exited: " + (root / "server.log").read_text()[-3000:])
        try:
            return get(f"{server.api}/health", headers={"Authorization": f"token {TOKEN}"},
                       timeout=5).status == 200
        except OSError:
            return False

    try:
        wait_until(healthy, timeout=60, interval=0.2, message="the extension's /health")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


AUTH = {"Authorization": f"token {TOKEN}"}


def test_rest_through_jupyter_auth(jupyter: Jupyter) -> None:
    res = post(f"{jupyter.api}/submissions?wait=true", {"source_code": "print('hi from jupyter')",
                                                         "language_id": 71}, headers=AUTH)
    assert res.status == 201, res.body
    assert res.json["status"]["description"] == "Accepted"
    assert res.json["stdout"] == "hi from jupyter\n"
    # runflare_nb's own header, X-Auth-Token, carries the same token
    res = get(f"{jupyter.api}/languages", headers={"X-Auth-Token": TOKEN})
    assert res.status == 200 and any(lang["id"] == 71 for lang in res.json)


def test_unauthenticated_requests_are_refused(jupyter: Jupyter) -> None:
    for headers in ({}, {"Authorization": "token wrong"}, {"X-Auth-Token": "wrong"}):
        res = get(f"{jupyter.api}/languages", headers=headers)
        assert res.status == 403, (headers, res.status)
        assert b"Python" not in res.body
        res = post(f"{jupyter.api}/submissions?wait=true", {"source_code": "print(1)", "language_id": 71},
                   headers=headers)
        assert res.status == 403, (headers, res.status)
    # the rest of the server refuses the same way
    assert get(f"{jupyter.url}/api/kernels").status == 403
    # the playground page, like Jupyter's pages, sends an unauthenticated browser to the login page
    opener = urllib.request.build_opener(NoRedirect)
    try:
        opener.open(f"{jupyter.url}/runflare/", timeout=10)
        raise AssertionError("served without auth")
    except urllib.error.HTTPError as exc:
        assert exc.code == 302 and "/login" in exc.headers["Location"]


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None


def test_playground_is_served_and_points_at_the_prefix(jupyter: Jupyter) -> None:
    res = get(f"{jupyter.url}/runflare/", headers=AUTH)  # urllib follows the redirect that adds ?server=
    assert res.status == 200 and b"<html" in res.body.lower()
    res = get(f"{jupyter.url}/runflare/runflare-editor.js", headers=AUTH)
    assert res.status in (200, 404)  # served by Run-Flare's own handler (404 when the bundle is not built)


def test_websocket_through_jupyter_auth(jupyter: Jupyter) -> None:
    src = "for i in range(3):\n    print('line', i, flush=True)\n"
    token = post(f"{jupyter.api}/submissions", {"source_code": src, "language_id": 71},
                 headers=AUTH).json["token"]
    ws_url = jupyter.api.replace("http://", "ws://") + f"/submissions/{token}/ws"
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url, open_timeout=10)
    assert refused.value.response.status_code == 403
    messages = []
    with connect(ws_url, additional_headers={"X-Auth-Token": TOKEN}, open_timeout=10) as ws:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                messages.append(json.loads(ws.recv(timeout=deadline - time.monotonic())))
            except ConnectionClosed:
                break
    assert messages[0]["type"] == "connected"
    text = "".join(m.get("text", "") for m in messages if m.get("stream") == "stdout")
    assert text == "line 0\nline 1\nline 2\n"
    statuses = [m for m in messages if m["type"] == "status_update"]
    assert statuses and statuses[-1]["status"]["id"] == 3
    # the token in the query (browsers cannot set WebSocket headers) works too
    with connect(ws_url + f"?X-Auth-Token={TOKEN}", open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "connected"


def test_the_jupyter_token_sent_in_a_url_never_reaches_jupyter_s_log(jupyter: Jupyter) -> None:
    """Under the extension, ?X-Auth-Token= carries the Jupyter server's own token; Jupyter Server's log scrubs
    query keys containing "token" as written, which neither "X-Auth-Token" nor its percent-encoded spelling
    (which Tornado decodes, so it authenticates as well) does. The refused requests below are logged."""
    marker = uuid.uuid4().hex
    assert get(f"{jupyter.api}/submissions/{marker}?X-Auth-Token={TOKEN}").status == 404
    assert get(f"{jupyter.api}/submissions/{marker}?X%2DAuth%2DToken={TOKEN}&X-Auth-User=u").status == 404
    assert get(f"{jupyter.api}/languages?X-Auth-Token={TOKEN}").status == 200

    def lines() -> list[str]:
        return [line for line in (jupyter.root / "server.log").read_text().splitlines() if marker in line]

    wait_until(lambda: len(lines()) >= 2, timeout=10, interval=0.1, message="the refused requests' log lines")
    assert all(TOKEN not in line for line in lines()), lines()
    assert any(f"/runflare/api/v1/submissions/{marker}?X-Auth-Token=[secret] " in line for line in lines())
    assert any(f"{marker}?X%2DAuth%2DToken=[secret]&X-Auth-User=[secret] " in line for line in lines())


def kernel_execute(jupyter: Jupyter, code: str) -> str:
    """Run `code` in a kernel the Jupyter server starts (its REST and kernel WebSocket API); its stdout."""
    kernel = post(f"{jupyter.url}/api/kernels", {"name": "python3"}, headers=AUTH)
    assert kernel.status == 201, kernel.body
    kid = kernel.json["id"]
    try:
        url = jupyter.url.replace("http://", "ws://") + f"/api/kernels/{kid}/channels"
        msg_id = uuid.uuid4().hex
        request = {"header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test",
                              "session": uuid.uuid4().hex, "version": "5.3"},
                   "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
                   "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                               "allow_stdin": False, "stop_on_error": True}}
        out = []
        with connect(url, additional_headers=AUTH, open_timeout=30, max_size=None) as ws:
            ws.send(json.dumps(request))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                msg = json.loads(ws.recv(timeout=deadline - time.monotonic()))
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                if msg["msg_type"] == "stream":
                    out.append(msg["content"]["text"])
                elif msg["msg_type"] == "error":
                    raise AssertionError("\n".join(msg["content"]["traceback"]))
                elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    return "".join(out)
        raise AssertionError("the kernel did not finish")
    finally:
        call("DELETE", f"{jupyter.url}/api/kernels/{kid}", headers=AUTH)


def test_runflare_magic_in_a_kernel_finds_the_extension(jupyter: Jupyter) -> None:
    code = ("import os\n"
            "print(os.environ['RUNFLARE_URL'])\n"
            "ip = get_ipython()\n"
            "ip.run_line_magic('load_ext', 'runflare_nb')\n"
            "ip.run_cell_magic('runflare', '--no-widget -l python --var sub', 'print(6 * 7)')\n"
            "print(sub['status']['description'])\n")
    out = kernel_execute(jupyter, code)
    assert out.splitlines()[0] == jupyter.url + "/runflare"
    lines = out.splitlines()
    assert "42" in lines[1:], out
    assert lines[-1] == "Accepted", out


def test_extension_list_shows_it(jupyter: Jupyter) -> None:
    (jupyter.root / "config" / "jupyter_server_config.json").write_text(
        json.dumps({"ServerApp": {"jpserver_extensions": {"runflare_jupyter": True}}}))
    try:
        out = subprocess.run([sys.executable, "-m", "jupyter", "server", "extension", "list"], env=jupyter.env,
                             capture_output=True, text=True, timeout=60)
    finally:
        (jupyter.root / "config" / "jupyter_server_config.json").unlink()
    listing = out.stdout + out.stderr
    assert "runflare_jupyter" in listing and "enabled" in listing, listing
    assert "OK" in listing.split("runflare_jupyter", 1)[1], listing


def test_cookie_login_posts_only_from_the_same_origin(jupyter: Jupyter) -> None:
    """The playground page runs on Jupyter's login cookie and sends no _xsrf: a POST carrying the cookie is
    let through when its Origin is this server, refused otherwise (a cross-site page cannot forge Origin)."""
    import http.cookiejar

    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    with opener.open(f"{jupyter.url}/runflare/?token={TOKEN}", timeout=10) as page:
        assert page.status == 200
    assert any(cookie.name.startswith("username-") for cookie in jar)
    body = json.dumps({"source_code": "print(5)", "language_id": 71}).encode()
    origin = jupyter.url.split("/jp")[0]

    def post_with_cookie(headers: dict[str, str]) -> int:
        request = urllib.request.Request(f"{jupyter.api}/submissions?wait=true", data=body, method="POST",
                                         headers={"Content-Type": "application/json", **headers})
        try:
            with opener.open(request, timeout=60) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert post_with_cookie({"Origin": origin}) == 201
    assert post_with_cookie({"Origin": "http://evil.example"}) in (403, 404)
    assert post_with_cookie({}) == 403
    with opener.open(f"{jupyter.api}/languages", timeout=10) as r:  # reads need no Origin
        assert r.status == 200
