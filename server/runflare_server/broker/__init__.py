"""The queue and the per-submission event streams: in-process (default); Redis implements the same interface."""

from __future__ import annotations

from typing import Any

from .base import Broker
from .memory import MemoryBroker

__all__ = ["Broker", "MemoryBroker", "open_broker"]


def open_broker(settings: Any) -> Broker:
    """The broker `settings.broker` names: "memory", or a redis:// URL shared by the cluster."""
    url = settings.broker
    if url == "memory":
        return MemoryBroker()
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import RedisBroker

        return RedisBroker(url, prefix=settings.broker_prefix, visibility_timeout=settings.visibility_timeout)
    raise SystemExit(f"unknown broker {url!r}: use memory or redis://HOST:PORT/DB")
