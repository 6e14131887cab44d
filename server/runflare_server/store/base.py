"""The store interface: submissions keyed by token. Every method is async and never blocks the loop."""

from __future__ import annotations

from typing import Any, Protocol

from ..submission import Submission

__all__ = ["Store", "StoreUnavailable", "Submission"]


class StoreUnavailable(Exception):
    """The store cannot be reached right now (the API answers 503 with Retry-After; workers retry)."""


class Store(Protocol):
    kind: str  # "sqlite", "postgresql"

    async def open(self) -> None:
        """Connect and migrate the schema to the current version."""

    async def close(self) -> None: ...

    async def ping(self) -> bool:
        """Whether the store answers."""

    async def create(self, subs: list[Submission]) -> None:
        """Persist new submissions durably before returning."""

    async def get(self, token: str) -> Submission | None: ...

    async def get_many(self, tokens: list[str]) -> list[Submission | None]:
        """In the order asked, None where a token is unknown."""

    async def update(self, token: str, changes: dict[str, Any]) -> Submission | None:
        """Merge `changes` into the stored document durably; the document after, or None if unknown."""

    async def page(self, offset: int, limit: int) -> tuple[list[Submission], int]:
        """Newest first, and the total count."""

    async def delete(self, token: str) -> Submission | None: ...

    async def unfinished(self) -> list[str]:
        """Tokens of queued or running submissions, oldest first."""
