"""The store interface: submissions as dicts keyed by token."""

from __future__ import annotations

from typing import Any, Protocol

Submission = dict[str, Any]


class Store(Protocol):
    async def open(self) -> None:
        """Connect and migrate the schema to the current version."""

    async def close(self) -> None: ...

    async def ping(self) -> bool:
        """Whether the store answers."""

    async def create(self, subs: list[Submission]) -> None:
        """Persist new submissions durably before returning."""

    async def get(self, token: str) -> Submission | None: ...

    async def get_many(self, tokens: list[str]) -> list[Submission | None]: ...

    async def update(self, token: str, changes: dict[str, Any]) -> None: ...

    async def page(self, offset: int, limit: int) -> tuple[list[Submission], int]:
        """Newest first, and the total count."""

    async def delete(self, token: str) -> Submission | None: ...

    async def unfinished(self) -> list[str]:
        """Tokens of queued or running submissions, oldest first (re-queued on start)."""
