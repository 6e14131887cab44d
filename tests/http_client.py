"""A tiny blocking HTTP client for the tests (stdlib only, so it tests the server, not a client library)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any


@dataclass
class Response:
    status: int
    body: bytes
    headers: Any

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def call(method: str, url: str, body: Any = None, *, raw: bytes | None = None,
         content_type: str = "application/json", headers: dict[str, str] | None = None,
         timeout: float = 60) -> Response:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return Response(r.status, r.read(), r.headers)
    except urllib.error.HTTPError as e:
        return Response(e.code, e.read(), e.headers)


def post(url: str, body: Any = None, **kw: Any) -> Response:
    return call("POST", url, body, **kw)


def get(url: str, **kw: Any) -> Response:
    return call("GET", url, **kw)
