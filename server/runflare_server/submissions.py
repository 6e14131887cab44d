"""The submission manager: validation, creation, lookup, waiting. Handlers stay thin and call this."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from . import events
from .broker import Broker
from .config import Settings
from .models import SubmissionRules
from .statuses import IN_QUEUE
from .store import Store


class QueueFull(Exception):
    """max_queue_size submissions are already waiting."""


class Submissions:
    """Create, read, list, delete and wait for submissions."""

    def __init__(self, settings: Settings, store: Store, broker: Broker, rules: SubmissionRules):
        self.settings = settings
        self.store = store
        self.broker = broker
        self.rules = rules

    async def create_many(self, bodies: list[Any], base64_encoded: bool) -> list[dict[str, Any]]:
        """Validate each body; store the valid ones durably, then queue them. Returns {"token"} or field errors."""
        answers: list[dict[str, Any]] = []
        new: list[dict[str, Any]] = []
        for body in bodies:
            data, errors = self.rules.validate(body, base64_encoded)
            if errors:
                answers.append(errors)
                continue
            sub = self._new(data)  # type: ignore[arg-type]
            new.append(sub)
            answers.append({"token": sub["token"]})
        if new:
            if await self.broker.depth() + len(new) > self.settings.max_queue_size:
                raise QueueFull()
            await self.store.create(new)
            for sub in new:
                await self.broker.publish(sub["token"], events.status_update(sub["token"], sub))
                await self.broker.publish(sub["token"], events.progress(sub["token"], "queued"))
                await self.broker.enqueue(sub["token"])
        return answers

    def _new(self, data: dict[str, Any]) -> dict[str, Any]:
        return {
            **data,
            "token": str(uuid.uuid4()),
            "status_id": IN_QUEUE,
            "created_at": time.time(),
            "finished_at": None,
            "stdout": None, "stderr": None, "compile_output": None, "message": None,
            "exit_code": None, "exit_signal": None, "time": None, "wall_time": None, "memory": None,
            "outputs": [],
            "session": {"kind": "kernel" if data.get("kernel") or (data.get("language_id") or 0) >= 1000
                        else "program"},
        }

    async def get(self, token: str) -> dict[str, Any] | None:
        return await self.store.get(token)

    async def wait(self, token: str, timeout: float) -> dict[str, Any] | None:
        """The submission once finished, or as it is when `timeout` runs out. Follows the event log."""
        async def final() -> None:
            async for event in self.broker.subscribe(token):
                if events.is_final(event):
                    return

        sub = await self.store.get(token)
        if sub is not None and sub["status_id"] <= 2 and self.broker.has_log(token):
            try:
                await asyncio.wait_for(final(), timeout)
            except asyncio.TimeoutError:
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

    async def delete(self, token: str) -> dict[str, Any] | None:
        return await self.store.delete(token)
