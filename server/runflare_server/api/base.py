"""The base handler: JSON in and out, auth, CORS, maintenance mode, error shapes without tracebacks."""

from __future__ import annotations

import hmac
import json
import re
from typing import Any

from tornado import web

from ..broker.base import BrokerUnavailable
from ..service import Service
from ..store.base import StoreUnavailable
from .access_log import ScrubbedRequestLogs

MAINTENANCE_RETRY_AFTER = 60  # seconds a client waits before retrying in maintenance mode
QUEUE_FULL_RETRY_AFTER = 5  # seconds a client waits before retrying when the queue is full
UNAVAILABLE_RETRY_AFTER = 2  # seconds a client waits when the store or the broker is briefly down


class ApiError(Exception):
    """An error answer: status code, JSON body (None = empty body) and headers (Allow, Retry-After)."""

    def __init__(self, status: int, body: Any = None, headers: dict[str, str] | None = None):
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}


def unavailable(exc: Exception) -> ApiError | None:
    """503 with Retry-After for a store or broker that is briefly down; None for any other failure."""
    if isinstance(exc, StoreUnavailable):
        what = "the store"
    elif isinstance(exc, BrokerUnavailable):
        what = "the queue"
    else:
        return None
    return ApiError(503, {"error": f"{what} is unavailable; retry shortly"},
                    {"Retry-After": str(UNAVAILABLE_RETRY_AFTER)})


def allowed_origin(origins: list[str], origin: str | None) -> str | None:
    if not origin or not origins:
        return None
    if "*" in origins or origin in origins:
        return origin
    return None


INTEGER = re.compile(r"-?(?:0|[1-9][0-9]*)\Z")  # an integer as JSON writes it (no +, spaces or leading zeros)


def raw_query(request: Any, name: str, default: str | None = None) -> str | None:
    """The last value of a query parameter, undecoded by Tornado's getters; 400 when it is not UTF-8."""
    values = request.query_arguments.get(name)
    if not values:
        return default
    try:
        return values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, {"error": f"{name} is not UTF-8"}) from None


def one_of(value: str | None, allowed: list[str]) -> bool:
    """Constant-time membership for secrets."""
    return value is not None and any(hmac.compare_digest(value.encode(), a.encode()) for a in allowed)


def check_auth(service: Service, request: Any, needs_user: bool) -> None:
    """401 without a valid X-Auth-Token when tokens are configured; 403 without an authorized X-Auth-User
    where one is needed (as in Judge0, nobody is authorized until authz_users is configured)."""
    settings = service.settings

    def value(name: str) -> str | None:
        raw = request.headers.get(name) or request.query_arguments.get(name, [b""])[0].decode("utf-8", "replace")
        return raw or None

    if settings.auth_tokens and not one_of(value("X-Auth-Token"), settings.auth_tokens):
        raise ApiError(401)
    if needs_user and not one_of(value("X-Auth-User"), settings.authz_users):
        raise ApiError(403)


HTTP_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")


def implemented_methods(handler: type[web.RequestHandler]) -> set[str]:
    """The methods a handler class answers (the others are 405 with `Allow` naming these)."""
    return {m for m in HTTP_METHODS
            if getattr(handler, m.lower(), None) is not getattr(web.RequestHandler, m.lower(), None)}


def method_not_allowed(handler: web.RequestHandler) -> None:
    """405 with `Allow` (RFC 9110) and a JSON body, for a method the route does not have."""
    raise ApiError(405, {"error": f"method {handler.request.method} not allowed"},
                   {"Allow": ", ".join(sorted(implemented_methods(type(handler))))})


@web.stream_request_body
class BaseHandler(ScrubbedRequestLogs, web.RequestHandler):
    """Every /api/v1 route. Bodies stream in, so an oversized one is refused (413) before it is read."""

    needs_user: set[str] = set()  # methods that also need X-Auth-User

    @property
    def service(self) -> Service:
        return self.application.settings["service"]

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        origin = allowed_origin(self.application.settings["service"].settings.cors_origins,
                                self.request.headers.get("Origin"))
        if origin:
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Vary", "Origin")

    def options(self, *args: Any) -> None:
        """CORS preflight."""
        self.set_header("Access-Control-Allow-Methods", "GET, POST, PUT, DELETE, OPTIONS")
        self.set_header("Access-Control-Allow-Headers", "Content-Type, X-Auth-Token, X-Auth-User")
        self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)
        self.finish()

    def prepare(self) -> None:
        self.chunks: list[bytes] = []
        if self.request.method not in implemented_methods(type(self)):
            method_not_allowed(self)
        if self.request.method == "OPTIONS":
            return
        check_auth(self.service, self.request, self.request.method in self.needs_user)
        if self.request.method in ("POST", "PUT", "DELETE") and self.service.settings.maintenance_mode:
            raise ApiError(503, {"error": "maintenance mode is on"}, {"Retry-After": str(MAINTENANCE_RETRY_AFTER)})
        limit = self.service.settings.max_body_size
        if int(self.request.headers.get("Content-Length") or 0) > limit:
            raise ApiError(413, {"error": f"body larger than {limit} bytes"})

    def data_received(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json_body(self) -> Any:
        """The request body as JSON: 415 for another content type, 400 when malformed."""
        ctype = self.request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, {"error": "Content-Type must be application/json"})
        try:
            return json.loads(self.body or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, {"error": f"malformed JSON: {exc}"}) from None

    def query(self, name: str, default: str | None = None) -> str | None:
        """A query parameter exactly as sent (its last value): Tornado's own getters strip whitespace and turn
        control characters into spaces, which would accept values the OpenAPI description rules out."""
        return raw_query(self.request, name, default)

    def integer(self, name: str, default: int) -> int:
        """An integer query parameter, written as JSON writes one; else 400."""
        value = self.query(name)
        if value is None:
            return default
        if not INTEGER.match(value):
            raise ApiError(400, {"error": f"{name} must be an integer"})
        return int(value)

    def flag(self, name: str) -> bool:
        """A boolean query parameter: `true` or `false`, as Judge0 reads them (absent: false); else 400."""
        value = self.query(name, "false")
        if value not in ("true", "false"):
            raise ApiError(400, {"error": f"{name} must be true or false"})
        return value == "true"

    def send(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(body))

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, Exception):
            e = unavailable(e) or e
        if isinstance(e, ApiError):
            if self._finished:
                return
            self.clear()
            self.set_default_headers()
            for name, value in e.headers.items():
                self.set_header(name, value)
            self.set_status(e.status)
            if e.body is None:
                self.clear_header("Content-Type")
                self.finish()
            else:
                self.finish(json.dumps(e.body))
            return
        super()._handle_request_exception(e)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Unexpected failures: a JSON error, never a traceback."""
        if status_code == 405:  # a method Tornado refuses before prepare (TRACE, CONNECT): Allow as well
            self.set_header("Allow", ", ".join(sorted(implemented_methods(type(self)))))
        reason = self._reason if status_code < 500 else "internal server error"
        self.finish(json.dumps({"error": reason}))


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        self.chunks = []
        raise ApiError(404, {"error": "Not Found"})
