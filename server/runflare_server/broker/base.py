"""The broker interface: a work queue, an ordered event stream per submission, and interactive stdin.

Every method is async. Events are addressed by token and ``seq`` (1, 2, ... per submission); a backend
shared by many processes (Redis) lets a WebSocket on any API node follow a run on any worker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

Event = dict[str, Any]


class BrokerUnavailable(Exception):
    """The broker cannot be reached right now (the API answers 503 with Retry-After; workers retry)."""


@dataclass(frozen=True)
class Job:
    """A token taken from the queue. `attempt` counts deliveries, this one included (a run whose worker
    died is delivered again); `receipt` is the backend's handle for `ack`."""

    token: str
    attempt: int = 1
    receipt: str = ""


class InputChannel(Protocol):
    """The stdin of one running interactive submission, read by the worker that runs it."""

    async def get(self) -> str | None:
        """The next chunk the client typed; None at end of input."""

    async def close(self) -> None: ...


class Broker(Protocol):
    kind: str  # "memory", "redis"

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> bool: ...

    async def enqueue(self, token: str) -> None: ...

    async def dequeue(self) -> Job:
        """The next job; waits while the queue is empty."""

    async def ack(self, job: Job) -> None:
        """The job is done: its final state is stored. Unacknowledged jobs of a dead worker come back."""

    async def depth(self) -> int:
        """Jobs waiting to be taken (across the whole cluster)."""

    async def publish(self, token: str, event: Event, final: bool = False) -> Event:
        """Append an event to the token's stream, stamping the next `seq`; `final` ends the stream."""

    async def publish_many(self, token: str, events: list[Event], final: bool = False,
                           result: dict[str, Any] | None = None) -> list[Event]:
        """Append the events in order, in one step; `final` ends the stream after the last one. `result`,
        with `final`: the submission as just stored, which the node waiting for the run may answer with."""

    async def announce(self, token: str, events: list[Event], watch: bool = False) -> list[Event]:
        """Open (or go on with) the token's stream with `events`, then queue the token, in one step.
        `watch`: this node will `wait_final` for the run (a wait=true request)."""

    async def wait_final(self, token: str) -> dict[str, Any] | None:
        """Return once the run's final event is published, or the broker can no longer tell; the stored
        submission if its final publish brought it here, else None (the store has the answer).
        BrokerUnavailable if it cannot be reached."""

    async def has_log(self, token: str) -> bool:
        """Whether the token has an event stream here (live, or finished and not yet expired)."""

    async def last_seq(self, token: str) -> int: ...

    def subscribe(self, token: str, since: int = 0) -> AsyncIterator[Event]:
        """Events with seq > since, replayed then live, ending after the final one."""

    async def send_input(self, token: str, chunk: str | None) -> bool:
        """Feed an interactive run's stdin (None = end of input); False if too much is waiting unread."""

    async def open_input(self, token: str) -> InputChannel:
        """The channel the worker running `token` reads its stdin from."""

    async def tracked(self) -> set[str]:
        """Tokens queued or taken and not yet acked, by any worker (what a worker recovering after the
        broker lost its data must not queue again)."""

    async def try_lock(self, name: str, ttl: float) -> bool:
        """Take the cluster-wide lock `name` for `ttl` seconds unless someone holds it (one reconciler)."""

    async def set_catalog(self, catalog: dict[str, Any]) -> None:
        """Workers tell the cluster what they run: languages and kernelspecs (API nodes list these)."""

    async def catalog(self) -> dict[str, Any] | None:
        """What the workers last said they run; None until a worker has said it."""
