"""The access log: credentials sent as query parameters never reach a log line; successes are DEBUG lines."""

from __future__ import annotations

import logging

import pytest
from conftest import start_server
from http_client import get, post
from tornado import web
from websockets.sync.client import connect

from runflare_server.api.access_log import ScrubbedRequestLogs, level_of, log_request, scrub_uri

SECRET = "s3cret-tok3n-of-the-operator"
USER = "b0ss-of-the-class"
LEAN = {"RUNFLARE_KERNEL_POOL": "{}"}


def served_log(tmp_path, level: str) -> str:
    """The log of a real server at ``level`` that was asked with credentials in its URLs, over HTTP and a
    WebSocket, rightly and wrongly; read once the server stopped."""
    server = start_server(tmp_path, "--auth-token", SECRET, "--authz-user", USER, "--log-level", level, env=LEAN)
    try:
        api = server.api
        assert get(f"{api}/languages?X-Auth-Token={SECRET}").status == 200
        assert get(f"{api}/submissions?X-Auth-Token={SECRET}&X-Auth-User={USER}").status == 200
        assert get(f"{api}/languages?x%2Dauth%2Dtoken={SECRET}x&page=1").status == 401  # a near guess
        assert get(f"{api}/no-such-route?X-Auth-Token={SECRET}").status == 404
        token = post(f"{api}/submissions?wait=true", {"source_code": "print(1)", "language_id": 71},
                     headers={"X-Auth-Token": SECRET}).json["token"]
        ws_url = server.url.replace("http://", "ws://") + f"/api/v1/submissions/{token}/ws?X-Auth-Token={SECRET}"
        with connect(ws_url) as ws:
            assert ws.recv(timeout=30)
    finally:
        server.stop()
    return (tmp_path / "server.log").read_text()


def test_no_credential_from_a_url_reaches_the_log_at_debug(tmp_path):
    log = served_log(tmp_path, "DEBUG")
    assert SECRET not in log and USER not in log
    access = [line for line in log.splitlines() if "tornado.access" in line]
    assert any("DEBUG tornado.access: 200 GET /api/v1/languages?X-Auth-Token=[secret] " in line for line in access)
    assert any("GET /api/v1/submissions?X-Auth-Token=[secret]&X-Auth-User=[secret] " in line for line in access)
    assert any("WARNING tornado.access: 401 GET /api/v1/languages?x%2Dauth%2Dtoken=[secret]&page=1 " in line
               for line in access)
    assert any("WARNING tornado.access: 404 GET /api/v1/no-such-route?X-Auth-Token=[secret] " in line
               for line in access)
    assert any("DEBUG tornado.access: 101 GET /api/v1/submissions/" in line and "/ws?X-Auth-Token=[secret] " in line
               for line in access)


def test_successes_are_not_logged_at_info_and_errors_are(tmp_path):
    log = served_log(tmp_path, "INFO")
    access = [line for line in log.splitlines() if "tornado.access" in line]
    assert access and all(" WARNING tornado.access: 40" in line for line in access), access
    assert SECRET not in log and USER not in log
    # the Run-Flare kernels' shutdown at the server's stop publishes into a closed socket: dropped, not a traceback
    assert "Traceback" not in log and "Uncaught exception" not in log


@pytest.mark.parametrize("trusted", [False, True])
def test_a_client_names_its_address_only_to_a_server_told_to_trust_its_proxy(tmp_path, trusted):
    """The address in the log is the connection's unless RUNFLARE_TRUST_XHEADERS is set (a proxy's deployment):
    a client cannot blame another address for its refused requests. (The header's address is only text here.)"""
    server = start_server(tmp_path, env={**LEAN, "RUNFLARE_TRUST_XHEADERS": str(trusted).lower()})
    try:
        assert get(f"{server.api}/no-such-route", headers={"X-Real-Ip": "203.0.113.7"}).status == 404
    finally:
        server.stop()
    lines = [line for line in (tmp_path / "server.log").read_text().splitlines() if "404 GET /api/v1/no-such-route" in line]
    assert len(lines) == 1
    assert lines[0].split("route ")[1].startswith("(203.0.113.7)" if trusted else "(127.0.0.1)")


@pytest.mark.parametrize(("uri", "scrubbed"), [
    ("/a", "/a"),
    ("/a?", "/a?"),
    ("/a?X-Auth-Token=t", "/a?X-Auth-Token=[secret]"),
    ("/a?x-auth-user=u&X-Auth-Token", "/a?x-auth-user=[secret]&X-Auth-Token=[secret]"),
    ("/a?X%2dAuth%2dToken=t&+X-Auth-Token=t", "/a?X%2dAuth%2dToken=[secret]&+X-Auth-Token=[secret]"),
    ("/a?wait=true&X-Auth-Token=t=u&fields=token", "/a?wait=true&X-Auth-Token=[secret]&fields=token"),
    ("/a?X-Auth-Tokens=t&token=t", "/a?X-Auth-Tokens=t&token=t"),  # other names are kept as sent
])
def test_scrub_uri(uri, scrubbed):
    assert scrub_uri(uri) == scrubbed


def test_levels_follow_the_outcome():
    assert [level_of(s) for s in (101, 200, 204, 304, 301, 400, 404, 500, 503)] == [
        logging.DEBUG, logging.DEBUG, logging.DEBUG, logging.DEBUG, logging.INFO, logging.WARNING,
        logging.WARNING, logging.ERROR, logging.ERROR]


class Boom(ScrubbedRequestLogs, web.RequestHandler):
    def get(self) -> None:
        raise RuntimeError("a bug in a handler")


@pytest.fixture
def app():
    return web.Application([(r"/boom", Boom)], log_function=log_request)


async def test_an_uncaught_exception_is_logged_without_the_credential(http_server_client, caplog):
    caplog.set_level(logging.DEBUG)
    response = await http_server_client.fetch(f"/boom?X-Auth-Token={SECRET}", raise_error=False)
    assert response.code == 500
    errors = [r for r in caplog.records if r.name == "tornado.application"]
    assert errors and errors[0].exc_info and "a bug in a handler" in str(errors[0].exc_info[1])
    assert "GET /boom?X-Auth-Token=[secret]" in errors[0].getMessage()
    assert all(SECRET not in r.getMessage() for r in caplog.records)
    assert any(r.name == "tornado.access" and r.levelno == logging.ERROR for r in caplog.records)
