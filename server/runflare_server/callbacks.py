"""Callbacks: on finish, PUT the result to the submission's callback_url, without blocking the worker."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

log = logging.getLogger(__name__)


class Callbacks:
    """Fire-and-forget PUTs, retried on connection errors (not on HTTP error answers)."""

    def __init__(self, max_tries: int, timeout: float, backoff: float = 0.5):
        self.max_tries = max_tries
        self.timeout = timeout
        self.backoff = backoff
        self._tasks: set[asyncio.Task] = set()

    def send(self, url: str, body: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._put(url, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _put(self, url: str, body: dict[str, Any]) -> None:
        client = AsyncHTTPClient()
        payload = json.dumps(body)
        for attempt in range(1, self.max_tries + 1):
            try:
                await client.fetch(url, method="PUT", body=payload, headers={"Content-Type": "application/json"},
                                   request_timeout=self.timeout, connect_timeout=self.timeout)
                return
            except HTTPClientError as exc:
                if exc.code != 599:
                    log.warning("callback %s answered %s", url, exc.code)
                    return
                log.info("callback %s failed (try %d): %s", url, attempt, exc)
            except OSError as exc:
                log.info("callback %s failed (try %d): %s", url, attempt, exc)
            except Exception:
                log.exception("callback %s failed", url)
                return
            if attempt < self.max_tries:
                await asyncio.sleep(self.backoff * attempt)

    async def drain(self, timeout: float = 5.0) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)
        for task in list(self._tasks):
            task.cancel()

