"""callback_url is a request the server makes for a submitter: it never reaches the host or its private
networks unless the operator allow-lists them, the check holds on the resolved address, and a URL
cannot forge log lines.

Only 127.0.0.1 is ever connected to. Every other forbidden address is checked on the filter and on the
resolver (resolving an IP literal sends no packet)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import threading

import pytest
from conftest import start_server, wait_until
from http_client import get, post
from tornado.httpserver import HTTPServer
from tornado.netutil import OverrideResolver, Resolver, bind_sockets
from tornado.web import Application, RequestHandler

from runflare_server.callbacks import Callbacks
from runflare_server.outbound import (
    GuardedResolver,
    RefusedDestination,
    literal_refusal,
    parse_networks,
    refusal,
    url_problem,
)

BODY = {"token": "t0k3n", "status": {"id": 3}}


class Sink:
    """A real Tornado HTTP server on 127.0.0.1 (ephemeral port), in its own thread and loop, recording every
    connection and request. /redirect answers 307 to /inner, /status/N answers N, /drop-first drops its first
connection without an answer, /hang never answers."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[tuple[str, str, bytes]] = []
        started = threading.Event()
        self.thread = threading.Thread(target=asyncio.run, args=(self._serve(started),), daemon=True)
        self.thread.start()
        assert started.wait(10)

    async def _serve(self, started: threading.Event) -> None:
        sink = self

        class Recorder(RequestHandler):
            async def put(self) -> None:
                sink.requests.append((self.request.method, self.request.path, self.request.body))
                path = self.request.path
                if path == "/redirect":
                    self.redirect(f"http://127.0.0.1:{sink.port}/inner", status=307)
                elif path.startswith("/status/"):
                    self.set_status(int(path.rsplit("/", 1)[1]))
                elif path == "/drop-first" and [r[1] for r in sink.requests].count(path) == 1:
                    self.request.connection.stream.close()  # no answer at all: a connection error
                elif path == "/hang":
                    await sink.stopping.wait()  # answers nothing until the sink closes

            get = post = put

        class CountingServer(HTTPServer):
            def handle_stream(self, stream, address):
                sink.connections += 1
                return super().handle_stream(stream, address)

        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        server = CountingServer(Application([(r"/.*", Recorder)]))
        sockets = bind_sockets(0, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        server.add_sockets(sockets)
        started.set()
        await self.stopping.wait()
        server.stop()
        await server.close_all_connections()

    def url(self, path: str = "/done", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(10)


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.close()


def deliver(url: str, allowed: list[str] | None = None, max_tries: int = 3, timeout: float = 5.0) -> None:
    """Send one callback through a fresh Callbacks and wait until it is done (sent, refused or given up)."""

    async def main() -> None:
        callbacks = Callbacks(max_tries, timeout, backoff=0.01, allowed_networks=allowed or [])
        callbacks.send(url, BODY)
        await callbacks.drain(30)

    asyncio.run(main())


def callback_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "runflare_server.callbacks"]


# -- Against the real sink on 127.0.0.1 ----------------------------------------------------------------

def test_loopback_refused_by_default_and_not_retried(sink, caplog):
    caplog.set_level(logging.INFO, logger="runflare_server.callbacks")
    deliver(sink.url())
    assert sink.connections == 0 and sink.requests == []
    (record,) = callback_records(caplog)  # logged once, no retry
    assert record.levelno == logging.WARNING
    assert "refused" in record.getMessage() and "loopback address 127.0.0.1" in record.getMessage()


def test_loopback_delivered_when_allow_listed(sink, caplog):
    caplog.set_level(logging.INFO, logger="runflare_server.callbacks")
    deliver(sink.url(), allowed=["127.0.0.0/8"])
    assert sink.requests == [("PUT", "/done", json.dumps(BODY).encode())]
    assert callback_records(caplog) == []


def test_name_resolving_to_loopback_is_refused(sink, caplog):
    """The check is on what the name resolves to, when connecting: `localhost` is not an IP literal."""
    caplog.set_level(logging.INFO, logger="runflare_server.callbacks")
    url = sink.url(host="localhost")
    assert url_problem(url) is None and literal_refusal(url, []) is None  # nothing to see before lookup
    deliver(url)
    assert sink.connections == 0 and sink.requests == []
    (record,) = callback_records(caplog)
    assert record.levelno == logging.WARNING
    assert "'localhost' resolves only to loopback address" in record.getMessage()


def test_allow_listed_name_is_delivered(sink):
    deliver(sink.url(host="localhost"), allowed=["127.0.0.0/8", "::1/128"])
    assert [r[:2] for r in sink.requests] == [("PUT", "/done")]


def test_redirect_is_not_followed(sink, caplog):
    deliver(sink.url("/redirect"), allowed=["127.0.0.0/8"])
    assert [r[:2] for r in sink.requests] == [("PUT", "/redirect")]  # /inner never asked
    assert any("answered 307" in r.getMessage() for r in callback_records(caplog))


@pytest.mark.parametrize("code", [500, 503, 404, 400])
def test_http_error_answer_is_not_retried(sink, caplog, code):
    caplog.set_level(logging.INFO, logger="runflare_server.callbacks")
    deliver(sink.url(f"/status/{code}"), allowed=["127.0.0.0/8"])
    assert [r[:2] for r in sink.requests] == [("PUT", f"/status/{code}")]  # one try: the receiver answered
    (record,) = callback_records(caplog)
    assert record.levelno == logging.WARNING and f"answered {code}" in record.getMessage()


def test_connection_dropped_without_answer_is_retried(sink, caplog):
    caplog.set_level(logging.INFO, logger="runflare_server.callbacks")
    deliver(sink.url("/drop-first"), allowed=["127.0.0.0/8"])
    assert [r[:2] for r in sink.requests] == [("PUT", "/drop-first")] * 2  # dropped, then delivered
    assert sink.requests[1][2] == json.dumps(BODY).encode()
    assert [r.levelno for r in callback_records(caplog)] == [logging.INFO]  # "failed (try 1)", then sent


def test_receiver_that_never_answers_is_tried_max_tries_times(sink, caplog):
    caplog.set_level(logging.INFO, logger="runflare_server.callbacks")
    deliver(sink.url("/hang"), allowed=["127.0.0.0/8"], max_tries=2, timeout=0.5)
    assert [r[:2] for r in sink.requests] == [("PUT", "/hang")] * 2  # each try timed out, then it gave up
    messages = [r.getMessage() for r in callback_records(caplog)]
    assert len(messages) == 2 and "failed (try 1)" in messages[0] and "failed (try 2)" in messages[1], messages


@pytest.mark.parametrize("make_url", [
    lambda port: f"http://user:pw@127.0.0.1:{port}/done",
    lambda port: f"http://127.0.0.1@127.0.0.1:{port}/done",
    lambda port: f"ftp://127.0.0.1:{port}/done",
])
def test_userinfo_and_other_schemes_refused_even_when_allowed(sink, caplog, make_url):
    deliver(make_url(sink.port), allowed=["127.0.0.0/8"])
    assert sink.connections == 0
    (record,) = callback_records(caplog)
    assert record.levelno == logging.WARNING and "refused" in record.getMessage()


# -- Log lines ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tail", ["\r\nCRITICAL root: forged", "\nCRITICAL root: forged", "\u2028forged",
                                  "\x85forged", "\x1b[2Kforged"])
def test_url_cannot_forge_a_log_line(caplog, tail):
    caplog.set_level(logging.INFO, logger="runflare_server.callbacks")
    deliver("http://127.0.0.1:9/x" + tail)
    (record,) = callback_records(caplog)
    line = logging.Formatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert line.splitlines() == [line]  # one line, whatever separators str.splitlines knows
    assert not any(not c.isprintable() for c in line)
    assert "forged" in line and line.startswith("WARNING runflare_server.callbacks: callback 'http://")


def test_control_characters_rejected_at_submission_time():
    for url in ("http://example.com/\r\nX: y", "http://example.com/\tx", "http://exa mple.com/",
                "http://example.com/\x00"):
        assert url_problem(url) == "must not contain control characters or spaces"


# -- The filter and the resolver, for addresses never connected to ------------------------------------

FORBIDDEN = {
    "169.254.169.254": "link-local",
    "10.0.0.1": "private",
    "172.16.5.4": "private",
    "192.168.1.1": "private",
    "100.64.0.1": "shared (CGNAT)",
    "0.0.0.0": "unspecified",
    "127.0.0.2": "loopback",
    "224.0.0.1": "multicast",
    "255.255.255.255": "reserved",
    "192.0.0.8": "reserved",
    "::1": "loopback",
    "::": "unspecified",
    "::ffff:127.0.0.1": "loopback",  # IPv4-mapped
    "::ffff:169.254.169.254": "link-local",
    "64:ff9b::a9fe:a9fe": "link-local",  # NAT64 of 169.254.169.254
    "64:ff9b::a00:1": "private",  # NAT64 of 10.0.0.1
    "2002:7f00:1::1": "loopback",  # 6to4 of 127.0.0.1
    "::7f00:1": "reserved",  # IPv4-compatible (deprecated)
    "fe80::1": "link-local",
    "fd00:ec2::254": "private",  # ULA (AWS's IPv6 metadata address)
    "fec0::1": "site-local",
    "ff02::1": "multicast",
    "2001:db8::1": "reserved",
}


@pytest.mark.parametrize("addr,kind", FORBIDDEN.items())
def test_forbidden_address_refused_by_filter(addr, kind):
    assert refusal(ipaddress.ip_address(addr), []).startswith(kind + " address ")
    host = f"[{addr}]" if ":" in addr else addr
    assert literal_refusal(f"http://{host}:8080/x", []).startswith(kind)  # and at submission time


@pytest.mark.parametrize("addr", ["169.254.169.254", "10.0.0.1", "::1", "::ffff:127.0.0.1", "0.0.0.0"])
def test_forbidden_literal_refused_by_resolver(addr):
    """What the HTTP client's connect goes through: the resolver raises, so there is nothing to connect to."""

    async def main():
        resolver = GuardedResolver(allowed=[])
        try:
            return await resolver.resolve(addr, 80)
        finally:
            resolver.close()

    with pytest.raises(RefusedDestination, match="resolves only to"):
        asyncio.run(main())


def test_rebinding_name_checked_on_each_resolution():
    """A name whose DNS answer is loopback (as a rebinding DNS server gives on the second lookup) is refused
    when it resolves, whatever it resolved to when submitted; allow-listed, it passes."""
    inner = OverrideResolver(resolver=Resolver(), mapping={"callback.example": "127.0.0.1"})

    async def main(allowed):
        return await GuardedResolver(allowed=parse_networks(allowed), resolver=inner).resolve("callback.example", 80)

    with pytest.raises(RefusedDestination, match="loopback address 127.0.0.1"):
        asyncio.run(main([]))
    assert asyncio.run(main(["127.0.0.0/8"])) == [(socket.AF_INET, ("127.0.0.1", 80))]


@pytest.mark.parametrize("addr", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8",
                                  "64:ff9b::808:808", "2002:808:808::1"])
def test_public_address_allowed_by_filter(addr):
    assert refusal(ipaddress.ip_address(addr), []) is None


def test_allow_list():
    assert refusal(ipaddress.ip_address("10.1.2.3"), parse_networks(["10.0.0.0/8"])) is None
    assert refusal(ipaddress.ip_address("10.1.2.3"), parse_networks(["192.168.0.0/16"])) is not None
    assert refusal(ipaddress.ip_address("::ffff:127.0.0.1"), parse_networks(["127.0.0.0/8"])) is None
    assert refusal(ipaddress.ip_address("::1"), parse_networks(["127.0.0.0/8"])) is not None
    with pytest.raises(ValueError, match="'nope'"):
        parse_networks(["nope"])


# -- Through the whole server ---------------------------------------------------------------------------

HELLO = {"source_code": 'print("Hello!")', "language_id": 71}
LEAN = {"RUNFLARE_KERNEL_POOL": "{}"}


def wait_finished(api: str, token: str) -> None:
    wait_until(lambda: get(f"{api}/submissions/{token}").json["status"]["id"] >= 3)


@pytest.mark.slow
def test_server_refuses_loopback_callbacks_by_default(tmp_path, sink):
    server = start_server(tmp_path, "--workers", "1", env=LEAN)
    try:
        api = server.api
        r = post(f"{api}/submissions", {**HELLO, "callback_url": sink.url()})
        assert r.status == 422 and r.json == {"callback_url": ["must not point to loopback address 127.0.0.1"]}
        r = post(f"{api}/submissions", {**HELLO, "callback_url": "http://example.com/\r\nX: y"})
        assert r.status == 422 and r.json == {"callback_url": ["must not contain control characters or spaces"]}
        r = post(f"{api}/submissions", {**HELLO, "callback_url": "http://u:p@example.com/"})
        assert r.status == 422 and r.json == {"callback_url": ["must not contain a user name or password"]}

        url = sink.url(host="localhost")  # a name: accepted, then refused when it resolves
        token = post(f"{api}/submissions", {**HELLO, "callback_url": url}).json["token"]
        wait_finished(api, token)
        log_file, expected = tmp_path / "server.log", f"callback {url!r} refused: 'localhost' resolves only to"
        wait_until(lambda: expected in log_file.read_text(), 30, message=expected)
    finally:
        server.stop()
    assert sink.connections == 0 and sink.requests == []
    assert log_file.read_text().count(expected) == 1


@pytest.mark.slow
def test_server_delivers_to_allow_listed_network(tmp_path, sink):
    server = start_server(tmp_path, "--workers", "1",
                          env={**LEAN, "RUNFLARE_CALLBACK_ALLOWED_NETWORKS": '["127.0.0.0/8"]'})
    try:
        token = post(f"{server.api}/submissions", {**HELLO, "callback_url": sink.url()}).json["token"]
        wait_until(lambda: sink.requests)
    finally:
        server.stop()
    ((method, path, body),) = sink.requests
    assert (method, path, json.loads(body)["token"]) == ("PUT", "/done", token)
