"""WebSocket messages: every one has type, timestamp and token (the broker or the socket adds seq)."""

from __future__ import annotations

import time
from typing import Any

from .models import iso, seconds
from .statuses import STATUSES


def now() -> str:
    return iso(time.time())  # type: ignore[return-value]


def message(kind: str, token: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "timestamp": now(), "token": token, **fields}


def status_update(token: str, sub: dict[str, Any]) -> dict[str, Any]:
    """A status change, with what is known of the result so far."""
    keys = ("stdout", "stderr", "compile_output", "exit_code", "exit_signal", "message", "memory")
    data: dict[str, Any] = {key: sub.get(key) for key in keys if sub.get(key) is not None}
    for key in ("time", "wall_time"):
        if sub.get(key) is not None:
            data[key] = seconds(sub[key])
    if sub.get("outputs"):
        data["outputs"] = sub["outputs"]
    return message("status_update", token, status=STATUSES[sub["status_id"]].ws(), data=data)


def progress(token: str, stage: str, text: str | None = None, **fields: Any) -> dict[str, Any]:
    return message("progress_update", token, stage=stage, message=text or STAGE_MESSAGES.get(stage, stage), **fields)


STAGE_MESSAGES = {
    "queued": "Waiting for a kernel",
    "starting": "Starting the kernel",
    "compiling": "Compiling",
    "running": "Running",
    "finished": "Finished",
}
