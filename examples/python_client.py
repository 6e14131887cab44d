#!/usr/bin/env python3
"""Submit a program to Run-Flare and print its run as it happens.

    python examples/python_client.py FILE [--language ID] [--stdin TEXT] [--poll]
    python examples/python_client.py --code 'print("hi")' --language 71

By default it opens the submission's WebSocket and prints every message (one JSON object per
line) as it arrives. With --poll, or when the socket cannot be opened, it GETs the submission
until its status id is greater than 2 and prints each status it sees.

The server address comes from --url, else env RUNFLARE_URL, else http://localhost:8787.
Exit code: 0 when the run is Accepted, the status id (4-14) otherwise, 1 when the client failed.
Needs only the standard library and the `websockets` package.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import websockets

EXTENSIONS = {".py": 71, ".js": 63, ".ts": 74, ".sh": 46, ".c": 50, ".cpp": 54, ".java": 62, ".rs": 73,
              ".go": 60, ".rb": 72}


def api(base: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One JSON request to the REST API; raises RuntimeError with the server's answer on HTTP errors."""
    headers = {"Content-Type": "application/json"}
    if os.environ.get("RUNFLARE_AUTH_TOKEN"):
        headers["X-Auth-Token"] = os.environ["RUNFLARE_AUTH_TOKEN"]
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + "/api/v1" + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{method} {path}: HTTP {e.code} {e.read().decode(errors='replace')}") from e


def create_submission(base: str, source: str, language_id: int, stdin: str | None) -> str:
    """POST /submissions and return the token."""
    created = api(base, "POST", "/submissions", {"source_code": source, "language_id": language_id, "stdin": stdin})
    return created["token"]


def ws_uri(base: str, token: str) -> str:
    """The submission's WebSocket address (ws:// for http://, wss:// for https://)."""
    parts = urllib.parse.urlsplit(base)
    scheme = "wss" if parts.scheme == "https" else "ws"
    query = urllib.parse.urlencode({"X-Auth-Token": os.environ["RUNFLARE_AUTH_TOKEN"]}) \
        if os.environ.get("RUNFLARE_AUTH_TOKEN") else ""
    return urllib.parse.urlunsplit((scheme, parts.netloc, f"{parts.path}/api/v1/submissions/{token}/ws", query, ""))


async def stream(base: str, token: str) -> int | None:
    """Print every WebSocket message as it arrives; return the final status id (None if none came)."""
    final = None
    async with websockets.connect(ws_uri(base, token)) as ws:
        async for raw in ws:
            print(raw, flush=True)
            msg = json.loads(raw)
            if msg.get("type") == "status_update" and msg["status"]["id"] > 2:
                final = msg["status"]["id"]
    return final


def poll(base: str, token: str, interval: float = 0.5) -> int:
    """GET the submission until its status id is > 2, printing each new status; return that id."""
    seen = None
    while True:
        sub = api(base, "GET", f"/submissions/{token}?fields=*")
        if sub["status"]["id"] != seen:
            seen = sub["status"]["id"]
            print(json.dumps(sub) if seen > 2 else json.dumps({"token": token, "status": sub["status"]}), flush=True)
        if seen > 2:
            return seen
        time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", nargs="?", help="program file (or use --code)")
    parser.add_argument("--code", help="program text instead of a file")
    parser.add_argument("--language", "-l", type=int, help="language id (default: from the file's extension)")
    parser.add_argument("--stdin", help="standard input for the program")
    parser.add_argument("--poll", action="store_true", help="poll the REST API instead of the WebSocket")
    parser.add_argument("--url", default=os.environ.get("RUNFLARE_URL", "http://localhost:8787"))
    args = parser.parse_args(argv)
    if (args.file is None) == (args.code is None):
        parser.error("give a FILE or --code")
    source = args.code if args.code is not None else Path(args.file).read_text()
    language = args.language or (EXTENSIONS.get(Path(args.file).suffix) if args.file else None)
    if not language:
        parser.error("cannot tell the language: pass --language ID")
    base = args.url.rstrip("/")

    try:
        token = create_submission(base, source, language, args.stdin)
        print(json.dumps({"token": token}), flush=True)
        status = None
        if not args.poll:
            try:
                status = asyncio.run(stream(base, token))
            except (OSError, websockets.exceptions.WebSocketException) as e:
                print(f"websocket failed ({e}); polling", file=sys.stderr)
        if status is None:
            status = poll(base, token)
    except (OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0 if status == 3 else status


if __name__ == "__main__":
    sys.exit(main())
