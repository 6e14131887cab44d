"""Callbacks: on finish, PUT the result to the submission's callback_url, without blocking the worker.

Only to addresses `outbound` allows (checked on the resolved address, at connect time), never following
a redirect. Logs print the URL and errors with %r, so control characters in them cannot forge log lines.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from typing import Any

from tornado.httpclient import HTTPClientError
from tornado.simple_httpclient import SimpleAsyncHTTPClient

from .outbound import GuardedResolver, RefusedDestination, parse_networks, url_problem

log = logging.getLogger(__name__)


class Callbacks:
    """Fire-and-forget PUTs, retried on connection errors (not on HTTP error answers, nor when refused)."""

    def __init__(self, max_tries: int, timeout: float, backoff: float = 0.5,
                 allowed_networks: Iterable[str] = ()):
        self.max_tries = max_tries
        self.timeout = timeout
        self.backoff = backoff
        self.allowed = parse_networks(allowed_networks)
        self._tasks: set[asyncio.Task] = set()
        self._http: SimpleAsyncHTTPClient | None = None
        self._resolver: GuardedResolver | None = None

    def send(self, url: str, body: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._put(url, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _client(self) -> SimpleAsyncHTTPClient:
        """Our own client (made in the running loop), whose every connection goes through the guard."""
        if self._http is None:
            self._resolver = GuardedResolver(allowed=self.allowed)
            self._http = SimpleAsyncHTTPClient(force_instance=True, resolver=self._resolver)
        return self._http

    async def _put(self, url: str, body: dict[str, Any]) -> None:
        problem = url_problem(url)
        if problem is not None:
            log.warning("callback %r refused: %s", url, problem)
            return
        client = self._client()
        payload = json.dumps(body)
        for attempt in range(1, self.max_tries + 1):
            try:
                await client.fetch(url, method="PUT", body=payload, headers={"Content-Type": "application/json"},
                                   request_timeout=self.timeout, connect_timeout=self.timeout,
                                   follow_redirects=False, streaming_callback=lambda _chunk: None)
                return
            except RefusedDestination as exc:
                log.warning("callback %r refused: %s", url, exc)
                return
            except HTTPClientError as exc:
                if exc.code != 599:
                    log.warning("callback %r answered %s", url, exc.code)
                    return
                log.info("callback %r failed (try %d): %r", url, attempt, str(exc))
            except OSError as exc:
                log.info("callback %r failed (try %d): %r", url, attempt, str(exc))
            except Exception:
                log.exception("callback %r failed", url)
                return
            if attempt < self.max_tries:
                await asyncio.sleep(self.backoff * attempt)

    async def drain(self, timeout: float = 5.0) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._http is not None:
            self._http.close()
            self._resolver.close()
            self._http = self._resolver = None
