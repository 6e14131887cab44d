"""Asyncio twin of :class:`runflare_nb.Client`: REST over Tornado's HTTP client, events over
the ``websockets`` asyncio client, polling GET when the socket cannot be opened or drops."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedOK, InvalidStatus, WebSocketException

from . import _protocol as p
from .client import WS_MAX_MESSAGE, WS_RETRIES
from .errors import HTTPError, NotFound, ServerUnreachable, WaitTimeout
from .languages import resolve


class AsyncClient:
    """A Run-Flare server at ``url`` (default: $RUNFLARE_URL, else http://127.0.0.1:8787); ``token``
    (default: $RUNFLARE_AUTH_TOKEN) is sent as X-Auth-Token."""

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
        return f"AsyncClient({self.url!r})"

    async def request(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        """One REST call under /api/v1; returns the decoded JSON or raises an HTTPError subclass."""
        url = self.api + path + ("?" + urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        req = HTTPRequest(url, method=method, body=data, headers=p.headers(self.token, data is not None),
                          request_timeout=timeout or self.timeout, connect_timeout=min(self.timeout, 10),
                          allow_nonstandard_methods=True)
        try:
            resp = await AsyncHTTPClient().fetch(req, raise_error=False)
        except (OSError, HTTPClientError) as exc:
            raise ServerUnreachable(self.url, exc) from exc
        if resp.code == 599:
            raise ServerUnreachable(self.url, resp.error)
        return p.parse_response(resp.code, resp.body or b"", url)

    async def languages(self, refresh: bool = False) -> list[dict[str, Any]]:
        """The server's active languages ``[{"id", "name"}]`` (cached)."""
        if self._languages is None or refresh:
            self._languages = await self.request("GET", "/languages")
        return self._languages

    async def language_id(self, language: str | int) -> int:
        """Resolve a name, alias, extension or id; server names are consulted only when needed."""
        try:
            return resolve(language)
        except ValueError:
            return resolve(language, await self.languages())

    async def submit(self, source: str, language: str | int | None = None, stdin: str | None = None,
                     expected_output: str | None = None, *, kernel: str | None = None, wait: bool = False,
                     **limits: Any) -> Any:
        """Create a submission; its token (or, with ``wait=True``, the finished submission)."""
        language_id = await self.language_id(language) if language is not None else None
        if language_id is None and kernel is None:
            language_id = 71
        body = p.submission_body(source, language_id, stdin, expected_output, kernel, limits)
        query = {"base64_encoded": "true", "wait": "true" if wait else "false"}
        if wait:
            query["fields"] = p.FINAL_FIELDS
        try:
            result = p.decode_submission(await self.request("POST", "/submissions", body, query))
        except HTTPError as e:
            retry = p.judge0_fallback(e, query)
            if retry is None:
                raise
            result = p.decode_submission(await self.request("POST", "/submissions", body, retry))
        if not wait:
            return result["token"]
        if p.is_final_status(p.status_id(result.get("status"))):
            return result
        return await self.wait(result["token"])

    async def get(self, token: str, fields: str | list[str] | None = None) -> dict[str, Any]:
        """A submission (every field by default), text fields decoded."""
        query = {"base64_encoded": "true", "fields": p.fields_param(fields)}
        try:
            return p.decode_submission(await self.request("GET", f"/submissions/{token}", query=query))
        except HTTPError as e:
            retry = p.judge0_fallback(e, query)
            if retry is None:
                raise
            return p.decode_submission(await self.request("GET", f"/submissions/{token}", query=retry))

    async def wait(self, token: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait until the submission is finished (following its event stream) and return it."""
        async for _ in self.stream(token, timeout=timeout):
            pass
        return await self.get(token)

    async def run(self, source: str, language: str | int | None = None, **kwargs: Any) -> dict[str, Any]:
        """Submit and wait: the finished submission."""
        return await self.wait(await self.submit(source, language, **kwargs))

    async def send_stdin(self, token: str, data: str = "", eof: bool = False) -> None:
        """Feed a running ``interactive`` submission's standard input (see ``Client.send_stdin``)."""
        message = json.dumps({"type": "stdin", "data": data, "eof": eof})
        ws = self._open.get(token)
        if ws is not None:
            try:
                await ws.send(message)
                return
            except WebSocketException:
                pass
        try:
            async with connect(p.ws_url(self.api, token, None), additional_headers=self._ws_headers(),
                               open_timeout=min(self.timeout, 10), max_size=WS_MAX_MESSAGE) as short:
                await short.send(message)
        except InvalidStatus as exc:
            if exc.response.status_code == 404:
                raise NotFound(404, {"error": "Not Found"}, token) from None
            raise ServerUnreachable(self.url, exc) from exc
        except (OSError, WebSocketException) as exc:
            raise ServerUnreachable(self.url, exc) from exc

    def _ws_headers(self) -> dict[str, str] | None:
        return {"X-Auth-Token": self.token} if self.token else None

    async def stream(self, token: str, since: int = 0,
                     timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """Yield the submission's events until its final status_update (see ``Client.stream``)."""
        tracker = p.StreamTracker(token, since)
        deadline = None if timeout is None else time.monotonic() + timeout
        retries = WS_RETRIES if self.websocket else -1
        while retries >= 0 and not tracker.done:
            seen = tracker.last_seq
            try:
                async for event in self._socket_events(token, tracker, deadline):
                    yield event
            except (NotFound, WaitTimeout):
                raise
            except (OSError, WebSocketException) as exc:
                if isinstance(exc, InvalidStatus) and exc.response.status_code == 404:
                    await self.get(token, "token")
                    break
                if not tracker.connected:
                    break
            if tracker.last_seq == seen:
                retries -= 1
        if not tracker.done:
            async for event in self._polled_events(token, tracker, deadline):
                yield event

    async def _socket_events(self, token: str, tracker: p.StreamTracker,
                             deadline: float | None) -> AsyncIterator[dict[str, Any]]:
        uri = p.ws_url(self.api, token, tracker.last_seq)
        async with connect(uri, additional_headers=self._ws_headers(), open_timeout=min(self.timeout, 10),
                           max_size=WS_MAX_MESSAGE) as ws:
            self._open[token] = ws
            try:
                while not tracker.done:
                    try:
                        raw = await asyncio.wait_for(ws.recv(), p.remaining(deadline))
                    except asyncio.TimeoutError:
                        raise WaitTimeout(f"submission {token} not finished in time") from None
                    except ConnectionClosedOK:
                        return
                    for event in tracker.from_socket(json.loads(raw)):
                        yield event
            finally:
                if self._open.get(token) is ws:
                    del self._open[token]

    async def _polled_events(self, token: str, tracker: p.StreamTracker,
                             deadline: float | None) -> AsyncIterator[dict[str, Any]]:
        backoff = p.Backoff()
        while True:
            for event in tracker.from_poll(await self.get(token)):
                yield event
            if tracker.done:
                return
            left = p.remaining(deadline)
            if left is not None and left <= 0:
                raise WaitTimeout(f"submission {token} not finished in time")
            pause = backoff.next()
            await asyncio.sleep(pause if left is None else min(pause, left))
