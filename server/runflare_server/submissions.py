"""The submission manager: validation, creation, lookup, waiting. Handlers stay thin and call this."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from . import events
from .broker import Broker
from .broker.base import BrokerUnavailable
from .config import Settings
from .models import SubmissionRules
from .statuses import is_final
from .store import Store
from .submission import Submission, new_submission

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """max_queue_size submissions are already waiting."""


class Submissions:
    """Create, read, list, delete and wait for submissions."""

    def __init__(self, settings: Settings, store: Store, broker: Broker, rules: SubmissionRules):
        self.settings = settings
        self.store = store
        self.broker = broker
        self.rules = rules

    async def create_many(self, bodies: list[Any], base64_encoded: bool, watch: bool = False) -> list[dict[str, Any]]:
        """Validate each body; store the valid ones durably, then queue them. Returns {"token"} or field errors.
        `watch`: the caller will `wait` for them (just_created)."""
        answers: list[dict[str, Any]] = []
        new: list[Submission] = []
        for body in bodies:
            data, errors = self.rules.validate(body, base64_encoded)
            if errors:
                answers.append(errors)
                continue
            sub = new_submission(data)  # type: ignore[arg-type]
            new.append(sub)
            answers.append({"token": sub["token"]})
        if new:
            if await self.broker.depth() + len(new) > self.settings.max_queue_size:
                raise QueueFull()
            await self.store.create(new)
            for sub in new:
                await self._announce(sub, watch)
        return answers

    async def _announce(self, sub: Submission, watch: bool = False) -> None:
        """Open the submission's event stream and queue it. The row is already durable: if the broker fails
        now, the workers' reconciler queues it later, so the client still gets its token."""
        token = sub["token"]
        try:
            await self.broker.announce(token, [events.status_update(token, sub), events.progress(token, "queued")],
                                       watch=watch)
        except Exception:
            log.warning("could not queue %s now; the reconciler will", token, exc_info=True)

    async def get(self, token: str) -> Submission | None:
        return await self.store.get(token)

    async def get_many(self, tokens: list[str]) -> list[Submission | None]:
        return await self.store.get_many(tokens)

    async def wait(self, token: str, timeout: float, just_created: bool = False) -> Submission | None:
        """The submission once finished, or as it is when `timeout` runs out. Follows the event log.
        `just_created`: this process has just stored and announced it, so it is unfinished and has a log
        (two round trips saved on the `?wait=true` path)."""
        if just_created:
            following = True
        else:
            sub = await self.store.get(token)
            following = sub is not None and not is_final(sub["status_id"]) and await self.broker.has_log(token)
        if following:
            try:
                told = await asyncio.wait_for(self.broker.wait_final(token), timeout)
                if told is not None:  # the worker's final publish brought the row it stored
                    return told  # type: ignore[return-value]
            except (asyncio.TimeoutError, BrokerUnavailable):  # the stored state is the answer then
                pass
            sub = await self.store.get(token)
        return sub

    async def page(self, page: int, per_page: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        subs, total = await self.store.page((page - 1) * per_page, per_page)
        pages = max(1, -(-total // per_page))
        meta = {
            "current_page": page,
            "next_page": page + 1 if page < pages else None,
            "prev_page": page - 1 if page > 1 else None,
            "total_pages": pages,
            "total_count": total,
        }
        return subs, meta

    async def delete(self, token: str) -> Submission | None:
        return await self.store.delete(token)
