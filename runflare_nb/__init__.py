"""Run-Flare from Python and notebooks: a REST + WebSocket client, the ``%runflare`` magic and a
live ipywidgets view. Talks to any Run-Flare (or Judge0) server over HTTP only."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .client import Client
from .errors import (
    AuthError,
    HTTPError,
    NotFound,
    RunflareError,
    ServerUnreachable,
    UnknownLanguage,
    ValidationError,
    WaitTimeout,
)
from .languages import resolve as resolve_language

if TYPE_CHECKING:
    from .async_client import AsyncClient
    from .widget import SubmissionWidget, run_widget, wait_all

__all__ = [
    "AsyncClient", "AuthError", "Client", "HTTPError", "NotFound", "RunflareError", "ServerUnreachable",
    "SubmissionWidget", "UnknownLanguage", "ValidationError", "WaitTimeout", "load_ipython_extension",
    "resolve_language", "run_widget", "unload_ipython_extension", "wait_all",
]

# Imported on first use: ipywidgets (widget) and tornado (async_client) are slow to import.
_LAZY = {"SubmissionWidget": "widget", "run_widget": "widget", "wait_all": "widget", "AsyncClient": "async_client"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext runflare_nb``: register ``%runflare`` / ``%%runflare`` (safe to repeat)."""
    from .magic import RunflareMagics

    ipython.register_magics(RunflareMagics)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext runflare_nb``: remove the magics."""
    magics = ipython.magics_manager.magics
    for kind in ("line", "cell"):
        magics[kind].pop("runflare", None)
