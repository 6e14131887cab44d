"""The access log: one line a request, at the level of its outcome (a success at DEBUG, as jupyter_server's
``log_request``), and never a credential. A browser's WebSocket cannot set headers, so ``X-Auth-Token`` and
``X-Auth-User`` may come as query parameters; their values are replaced before a URI is written to any log
line Tornado makes of a request (the access line, a refused request's warning, an uncaught exception's error).
"""

from __future__ import annotations

import logging
from types import TracebackType
from urllib.parse import unquote_plus

from tornado import httputil, web
from tornado.log import access_log, app_log

SECRET_PARAMETERS = frozenset({"x-auth-token", "x-auth-user"})  # compared case-insensitively, once decoded
HIDDEN = "[secret]"


def scrub_uri(uri: str) -> str:
    """``uri`` with the value of every credential query parameter replaced by ``[secret]``. Names are decoded
    as Tornado decodes them (``%2D`` is ``-``) and the query is split where Tornado splits it (``&``)."""
    path, sep, query = uri.partition("?")
    if not sep:
        return uri
    pairs = query.split("&")
    for i, pair in enumerate(pairs):
        name = pair.split("=", 1)[0]
        if unquote_plus(name, encoding="latin-1").strip().lower() in SECRET_PARAMETERS:
            pairs[i] = f"{name}={HIDDEN}"
    return f"{path}?{'&'.join(pairs)}"


def request_summary(request: httputil.HTTPServerRequest) -> str:
    """``METHOD URI (client address)``, the URI scrubbed."""
    return f"{request.method} {scrub_uri(request.uri or '')} ({request.remote_ip})"


def level_of(status: int) -> int:
    """DEBUG for a success (and 304), INFO for another redirect, WARNING for a client error, else ERROR."""
    if status < 300 or status == 304:
        return logging.DEBUG
    if status < 400:
        return logging.INFO
    return logging.WARNING if status < 500 else logging.ERROR


def log_request(handler: web.RequestHandler) -> None:
    """The application's ``log_function``: the line is only made when its level is logged."""
    status = handler.get_status()
    level = level_of(status)
    if access_log.isEnabledFor(level):
        access_log.log(level, "%d %s %.2fms", status, request_summary(handler.request),
                       1000.0 * handler.request.request_time())


class ScrubbedRequestLogs:
    """A handler mixin (first in the bases): Tornado's own log lines about a request show it scrubbed, and an
    uncaught exception's line leaves out the request's repr (its URI in full)."""

    __slots__ = ()
    request: httputil.HTTPServerRequest

    def _request_summary(self) -> str:
        return request_summary(self.request)

    def log_exception(self, typ: type[BaseException] | None, value: BaseException | None,
                      tb: TracebackType | None) -> None:
        if isinstance(value, web.HTTPError):
            super().log_exception(typ, value, tb)  # type: ignore[misc]  # a warning with _request_summary
            return
        app_log.error("Uncaught exception %s", self._request_summary(), exc_info=(typ, value, tb))  # type: ignore[arg-type]
