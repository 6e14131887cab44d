"""Blocking client for a Run-Flare (or Judge0) server: REST over urllib, events over
``websockets.sync``, polling GET when the socket cannot be opened or drops."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

from websockets.exceptions import ConnectionClosedOK, InvalidStatus, WebSocketException
from websockets.sync.client import connect

from . import _protocol as p
from .errors import HTTPError, NotFound, ServerUnreachable, WaitTimeout
from .languages import resolve

WS_RETRIES = 2  # reconnections (with ?since=) after a drop before falling back to polling
WS_MAX_MESSAGE = 64 << 20


class Client:
    """A Run-Flare server at ``url`` (default: $RUNFLARE_URL, else http://127.0.0.1:8787); ``token``
    (default: $RUNFLARE_AUTH_TOKEN) is sent as X-Auth-Token.

    ``websocket=False`` makes ``stream`` poll only.
    """

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 30.0,
                 websocket: bool = True) -> None:
        self.url = p.server_url(url)
        self.api = p.api_base(self.url)
        self.token = p.auth_token(token)
        self.timeout = timeout
        self.websocket = websocket
        self._languages: list[dict[str, Any]] | None = None
        self._open: dict[str, Any] = {}  # token -> the socket an active stream() is reading

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    # -- REST -------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None,
                timeout: float | None = None) -> Any:
        """One REST call under /api/v1; returns the decoded JSON or raises an HTTPError subclass."""
        url = self.api + path + ("?" + urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers=p.headers(self.token, data is not None))
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            raise ServerUnreachable(self.url, getattr(exc, "reason", exc)) from exc
        return p.parse_response(status, raw, url)

    def languages(self, refresh: bool = False) -> list[dict[str, Any]]:
        """The server's active languages ``[{"id", "name"}]`` (cached)."""
        if self._languages is None or refresh:
            self._languages = self.request("GET", "/languages")
        return self._languages

    def language_id(self, language: str | int) -> int:
        """Resolve a name, alias, extension or id; server names are consulted only when needed."""
        try:
            return resolve(language)
        except ValueError:
            return resolve(language, self.languages())

    def submit(self, source: str, language: str | int | None = None, stdin: str | None = None,
               expected_output: str | None = None, *, kernel: str | None = None, wait: bool = False,
               **limits: Any) -> Any:
        """Create a submission; returns its token (or, with ``wait=True``, the finished submission).

        ``limits`` are Judge0 fields (cpu_time_limit, memory_limit, command_line_arguments, ...);
        ``time_limit`` and ``args`` are accepted as short names.
        """
        language_id = self.language_id(language) if language is not None else None
        if language_id is None and kernel is None:
            language_id = 71
        body = p.submission_body(source, language_id, stdin, expected_output, kernel, limits)
        query = {"base64_encoded": "true", "wait": "true" if wait else "false"}
        if wait:
            query["fields"] = p.FINAL_FIELDS
        try:
            result = p.decode_submission(self.request("POST", "/submissions", body, query))
        except HTTPError as e:
            retry = p.judge0_fallback(e, query)
            if retry is None:
                raise
            result = p.decode_submission(self.request("POST", "/submissions", body, retry))
        if not wait:
            return result["token"]
        if p.is_final_status(p.status_id(result.get("status"))):
            return result
        return self.wait(result["token"])

    def get(self, token: str, fields: str | list[str] | None = None) -> dict[str, Any]:
        """A submission (every field by default), text fields decoded."""
        query = {"base64_encoded": "true", "fields": p.fields_param(fields)}
        try:
            return p.decode_submission(self.request("GET", f"/submissions/{token}", query=query))
        except HTTPError as e:
            retry = p.judge0_fallback(e, query)
            if retry is None:
                raise
            return p.decode_submission(self.request("GET", f"/submissions/{token}", query=retry))

    def wait(self, token: str, timeout: float | None = None) -> dict[str, Any]:
        """Block until the submission is finished (following its event stream) and return it."""
        for _ in self.stream(token, timeout=timeout):
            pass
        return self.get(token)

    def run(self, source: str, language: str | int | None = None, **kwargs: Any) -> dict[str, Any]:
        """Submit and wait: the finished submission."""
        return self.wait(self.submit(source, language, **kwargs))

    def send_stdin(self, token: str, data: str = "", eof: bool = False) -> None:
        """Feed a running ``interactive`` submission's standard input (``eof`` closes it).

        Goes through the socket of an active ``stream(token)`` when there is one, else through a
        short-lived connection. The server reports refusals as ``error`` events on the stream.
        """
        message = json.dumps({"type": "stdin", "data": data, "eof": eof})
        ws = self._open.get(token)
        if ws is not None:
            try:
                ws.send(message)
                return
            except WebSocketException:
                pass
        try:
            with connect(p.ws_url(self.api, token, None), additional_headers=self._ws_headers(),
                         open_timeout=min(self.timeout, 10), max_size=WS_MAX_MESSAGE) as short:
                short.send(message)
        except InvalidStatus as exc:
            if exc.response.status_code == 404:
                raise NotFound(404, {"error": "Not Found"}, token) from None
            raise ServerUnreachable(self.url, exc) from exc
        except (OSError, WebSocketException) as exc:
            raise ServerUnreachable(self.url, exc) from exc

    def _ws_headers(self) -> dict[str, str] | None:
        return {"X-Auth-Token": self.token} if self.token else None

    # -- events -----------------------------------------------------------------------------
    def stream(self, token: str, since: int = 0, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Yield the submission's events (SPEC "WebSocket") until its final status_update.

        Resumes with ``?since=SEQ`` after a drop and polls GET when the socket cannot be used;
        an event is never yielded twice.
        """
        tracker = p.StreamTracker(token, since)
        deadline = None if timeout is None else time.monotonic() + timeout
        retries = WS_RETRIES if self.websocket else -1
        while retries >= 0 and not tracker.done:
            seen = tracker.last_seq
            try:
                yield from self._socket_events(token, tracker, deadline)
            except (NotFound, WaitTimeout):
                raise
            except (OSError, WebSocketException) as exc:
                if isinstance(exc, InvalidStatus) and exc.response.status_code == 404:
                    self.get(token, "token")  # raises NotFound for a bad token; else the server has no socket
                    break
                if not tracker.connected:
                    break  # never opened: straight to polling
            if tracker.last_seq == seen:
                retries -= 1  # a reconnection that brought nothing new counts against the budget
        if not tracker.done:
            yield from self._polled_events(token, tracker, deadline)

    def _socket_events(self, token: str, tracker: p.StreamTracker,
                       deadline: float | None) -> Iterator[dict[str, Any]]:
        uri = p.ws_url(self.api, token, tracker.last_seq)
        with connect(uri, additional_headers=self._ws_headers(), open_timeout=min(self.timeout, 10),
                     max_size=WS_MAX_MESSAGE) as ws:
            self._open[token] = ws
            try:
                yield from self._receive(ws, token, tracker, deadline)
            finally:
                if self._open.get(token) is ws:
                    del self._open[token]

    @staticmethod
    def _receive(ws: Any, token: str, tracker: p.StreamTracker, deadline: float | None) -> Iterator[dict[str, Any]]:
        while not tracker.done:
            try:
                raw = ws.recv(timeout=p.remaining(deadline))
            except TimeoutError:
                raise WaitTimeout(f"submission {token} not finished in time") from None
            except ConnectionClosedOK:
                return
            yield from tracker.from_socket(json.loads(raw))

    def _polled_events(self, token: str, tracker: p.StreamTracker,
                       deadline: float | None) -> Iterator[dict[str, Any]]:
        backoff = p.Backoff()
        while True:
            yield from tracker.from_poll(self.get(token))
            if tracker.done:
                return
            pause = backoff.next()
            left = p.remaining(deadline)
            if left is not None and left <= 0:
                raise WaitTimeout(f"submission {token} not finished in time")
            time.sleep(pause if left is None else min(pause, left))
