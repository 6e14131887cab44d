"""The queue and the per-submission event streams: in-process (default); Redis implements the same interface."""

from .base import Broker
from .memory import MemoryBroker

__all__ = ["Broker", "MemoryBroker"]
