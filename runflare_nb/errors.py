"""Exceptions raised by the Run-Flare client."""

from __future__ import annotations

from typing import Any


class RunflareError(Exception):
    """Base class of every error this package raises."""


class ServerUnreachable(RunflareError, ConnectionError):
    """The server could not be reached at all (refused, DNS, timeout on connect)."""

    def __init__(self, url: str, reason: object) -> None:
        super().__init__(f"cannot reach Run-Flare server at {url}: {reason}")
        self.url = url
        self.reason = reason


class HTTPError(RunflareError):
    """The server answered with an HTTP error status."""

    def __init__(self, status: int, body: Any, url: str = "") -> None:
        self.status = status
        self.body = body
        self.url = url
        super().__init__(self._describe())

    def _describe(self) -> str:
        detail = self.body.get("error") if isinstance(self.body, dict) else self.body
        text = f"HTTP {self.status}"
        if detail:
            text += f": {detail}"
        return text + (f" ({self.url})" if self.url else "")


class AuthError(HTTPError):
    """401 (missing or wrong X-Auth-Token) or 403 (missing X-Auth-User)."""


class NotFound(HTTPError):
    """404: unknown submission token or route."""


class ValidationError(HTTPError):
    """422: the server rejected fields; ``errors`` maps each field to its messages."""

    @property
    def errors(self) -> dict[str, list[str]]:
        if not isinstance(self.body, dict):
            return {}
        return {k: v if isinstance(v, list) else [str(v)] for k, v in self.body.items() if k != "error"}

    def _describe(self) -> str:
        parts = [f"{field}: {'; '.join(map(str, msgs))}" for field, msgs in self.errors.items()]
        if isinstance(self.body, dict) and self.body.get("error"):
            parts.insert(0, str(self.body["error"]))
        return "invalid submission: " + (", ".join(parts) or str(self.body))


class UnknownLanguage(RunflareError, ValueError):
    """A language name that matches no known alias, extension or server language."""


class WaitTimeout(RunflareError, TimeoutError):
    """A submission did not finish within the caller's timeout."""


def error_for(status: int, body: Any, url: str = "") -> HTTPError:
    """The exception class that fits an HTTP error status."""
    cls: type[HTTPError] = HTTPError
    if status in (401, 403):
        cls = AuthError
    elif status == 404:
        cls = NotFound
    elif status == 422:
        cls = ValidationError
    return cls(status, body, url)
