"""What the sync and async clients share: URLs, request bodies, response parsing, and the
bookkeeping that turns a WebSocket (or polled GETs) into one ordered, duplicate-free event stream."""

from __future__ import annotations

import base64
import json
import os
import time
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from .errors import error_for

DEFAULT_URL = "http://127.0.0.1:8787"
TEXT_FIELDS = ("stdout", "stderr", "compile_output", "message")
JUDGE0_FIELDS = "*"  # exactly Judge0's keys
FINAL_FIELDS = "*,outputs"  # and Run-Flare's rich outputs (a plain Judge0 server refuses the name: see judge0_fallback)

STATUS_NAMES: dict[int, str] = {
    1: "In Queue", 2: "Processing", 3: "Accepted", 4: "Wrong Answer", 5: "Time Limit Exceeded",
    6: "Compilation Error", 7: "Runtime Error (SIGSEGV)", 8: "Runtime Error (SIGXFSZ)",
    9: "Runtime Error (SIGFPE)", 10: "Runtime Error (SIGABRT)", 11: "Runtime Error (NZEC)",
    12: "Runtime Error (Other)", 13: "Internal Error", 14: "Exec Format Error",
}

# Short option names accepted by submit() besides Judge0's own field names.
LIMIT_ALIASES = {
    "time_limit": "cpu_time_limit",
    "wall_limit": "wall_time_limit",
    "args": "command_line_arguments",
}


def server_url(url: str | None) -> str:
    """The server root: the argument, else $RUNFLARE_URL, else the default, without a trailing slash."""
    return (url or os.environ.get("RUNFLARE_URL") or DEFAULT_URL).rstrip("/")


TOKEN_ENV = "RUNFLARE_AUTH_TOKEN"
DEPRECATED_TOKEN_ENV = "RUNFLARE_TOKEN"


def auth_token(token: str | None) -> str | None:
    """The X-Auth-Token to send: the argument, else $RUNFLARE_AUTH_TOKEN, else none.

    The server's list of accepted tokens is its setting RUNFLARE_AUTH_TOKENS; a client holds one,
    RUNFLARE_AUTH_TOKEN. The old name RUNFLARE_TOKEN is still read, with a DeprecationWarning.
    """
    if token:
        return token
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    if os.environ.get(DEPRECATED_TOKEN_ENV):
        warnings.warn(f"${DEPRECATED_TOKEN_ENV} is deprecated: set ${TOKEN_ENV} instead",
                      DeprecationWarning, stacklevel=3)
        return os.environ[DEPRECATED_TOKEN_ENV]
    return None


def api_base(url: str) -> str:
    """The /api/v1 base for a server root (a URL already ending in /api/v1 is kept)."""
    return url if url.endswith("/api/v1") else url + "/api/v1"


def ws_url(api: str, token: str, since: int | None, auth_token: str | None = None) -> str:
    """The submission's WebSocket URL, resuming after ``since`` when given."""
    parts = urlsplit(api)
    scheme = "wss" if parts.scheme == "https" else "ws"
    query = {}
    if since:
        query["since"] = str(since)
    if auth_token:
        query["X-Auth-Token"] = auth_token
    return urlunsplit((scheme, parts.netloc, f"{parts.path}/submissions/{token}/ws", urlencode(query), ""))


def headers(auth_token: str | None, has_body: bool) -> dict[str, str]:
    """Request headers: JSON, and X-Auth-Token when configured."""
    out = {"Accept": "application/json", "User-Agent": "runflare-nb"}
    if has_body:
        out["Content-Type"] = "application/json"
    if auth_token:
        out["X-Auth-Token"] = auth_token
    return out


def _b64(text: str | None) -> str | None:
    return None if text is None else base64.b64encode(text.encode()).decode()


def submission_body(
    source: str, language_id: int | None, stdin: str | None, expected_output: str | None,
    kernel: str | None, limits: Mapping[str, Any],
) -> dict[str, Any]:
    """A POST /submissions body (base64 encoded text fields)."""
    body: dict[str, Any] = {"source_code": _b64(source)}
    if language_id is not None:
        body["language_id"] = language_id
    if kernel is not None:
        body["kernel"] = kernel
    if stdin is not None:
        body["stdin"] = _b64(stdin)
    if expected_output is not None:
        body["expected_output"] = _b64(expected_output)
    for key, value in limits.items():
        if value is not None:
            body[LIMIT_ALIASES.get(key, key)] = value
    return body


def judge0_fallback(error: Exception, query: dict[str, str]) -> dict[str, str] | None:
    """The query to retry with when a plain Judge0 server refused Run-Flare's field names, else None."""
    body = getattr(error, "body", None)
    refused = getattr(error, "status", None) == 400 and isinstance(body, dict) and \
        str(body.get("error", "")).startswith("invalid fields")
    if refused and query.get("fields") == FINAL_FIELDS:
        return {**query, "fields": JUDGE0_FIELDS}
    return None


def fields_param(fields: str | list[str] | tuple[str, ...] | None) -> str:
    """Judge0's ``fields`` query value."""
    if fields is None:
        return FINAL_FIELDS
    return fields if isinstance(fields, str) else ",".join(fields)


def parse_response(status: int, raw: bytes, url: str) -> Any:
    """The decoded JSON of a 2xx answer; the fitting HTTPError otherwise."""
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = raw.decode(errors="replace")
    if status >= 400:
        raise error_for(status, data, url)
    return data


def decode_submission(sub: Any) -> Any:
    """Decode the base64 text fields of a submission returned with base64_encoded=true."""
    if not isinstance(sub, dict):
        return sub
    out = dict(sub)
    for key in (*TEXT_FIELDS, "source_code", "stdin", "expected_output"):
        value = out.get(key)
        if isinstance(value, str):
            try:
                out[key] = base64.b64decode(value, validate=False).decode(errors="replace")
            except ValueError:
                pass
    return out


def status_id(status: Any) -> int | None:
    """The numeric id of a status given as a dict or an int."""
    if isinstance(status, dict):
        status = status.get("id")
    return status if isinstance(status, int) else None


def is_final_status(sid: int | None) -> bool:
    return sid is not None and sid not in (1, 2)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class StreamTracker:
    """Merges socket messages and polled submissions into one event stream: drops replayed
    events (by ``seq``), yields ``connected`` once, and fills gaps (output the stream did not
    carry) with synthetic events marked ``"source": "poll"`` or ``"source": "final"``."""

    def __init__(self, token: str, since: int = 0) -> None:
        self.token = token
        self.last_seq: int | None = since if since > 0 else None
        self.connected = False
        self.seen = {"stdout": "", "stderr": ""}
        self.displays = 0
        self.status: int | None = None
        self.done = False

    def _event(self, type_: str, source: str, **fields: Any) -> dict[str, Any]:
        return {"type": type_, "token": self.token, "timestamp": _now(), "seq": None, "source": source, **fields}

    def from_socket(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        """Events to yield for one socket message (none if it was already yielded)."""
        kind = msg.get("type")
        if kind == "connected":
            if self.connected:
                return []
            self.connected = True
            return [msg]
        seq = msg.get("seq")
        if kind in ("status_update", "progress_update") and isinstance(seq, int):
            if self.last_seq is not None and seq <= self.last_seq:
                return []
            self.last_seq = seq
        out: list[dict[str, Any]] = []
        if kind == "progress_update":
            stream = msg.get("stream")
            if stream in self.seen and isinstance(msg.get("text"), str):
                self.seen[stream] += msg["text"]
            if msg.get("display") is not None:
                self.displays += 1
        elif kind == "status_update":
            sid = status_id(msg.get("status"))
            if is_final_status(sid):
                out.extend(self._fill(msg.get("data") or {}, "final"))
                self.done = True
            self.status = sid
        out.append(msg)
        return out

    def from_poll(self, sub: dict[str, Any]) -> list[dict[str, Any]]:
        """Events to yield for a submission fetched with GET (fields=*, decoded)."""
        out = self._fill(sub, "poll")
        sid = status_id(sub.get("status"))
        if sid is not None and sid != self.status:
            desc = sub["status"].get("description") if isinstance(sub.get("status"), dict) else None
            name = STATUS_NAMES.get(sid, desc or str(sid))
            data = {k: sub.get(k) for k in (*TEXT_FIELDS, "time", "wall_time", "memory", "exit_code", "exit_signal")
                    if k in sub}
            out.append(self._event("status_update", "poll",
                                   status={"id": sid, "name": name, "description": desc or name}, data=data))
            self.status = sid
        if is_final_status(sid):
            self.done = True
        return out

    def _fill(self, data: Mapping[str, Any], source: str) -> list[dict[str, Any]]:
        out = []
        for stream, seen in self.seen.items():
            full = data.get(stream)
            if isinstance(full, str) and len(full) > len(seen) and full.startswith(seen):
                out.append(self._event("progress_update", source, stage="running", stream=stream,
                                       text=full[len(seen):]))
                self.seen[stream] = full
        outputs = data.get("outputs")
        if isinstance(outputs, list) and len(outputs) > self.displays:
            for display in outputs[self.displays:]:
                out.append(self._event("progress_update", source, stage="running", display=display))
            self.displays = len(outputs)
        return out


class Backoff:
    """Poll intervals growing from ``start`` to ``cap`` seconds."""

    def __init__(self, start: float = 0.1, cap: float = 1.0) -> None:
        self.value = start
        self.cap = cap

    def next(self) -> float:
        value = self.value
        self.value = min(self.cap, self.value * 1.5)
        return value


def remaining(deadline: float | None) -> float | None:
    """Seconds left before a monotonic deadline (None: no deadline)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())
