"""``runflare run FILE``: submit a file, stream its output to this terminal, exit with its exit code."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

from .client import Client
from .errors import RunflareError
from .languages import guess_from_filename

EXIT_TIME_LIMIT = 124
EXIT_FAILURE = 1
EXIT_USAGE = 2
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runflare run", description="Run a program on a Run-Flare server.")
    parser.add_argument("file", help="the program; its extension picks the language unless --language is given")
    parser.add_argument("-l", "--language", help="python, c++, js, c, java, rust, go ... or a Judge0 id")
    parser.add_argument("--stdin", help="standard input: text, or @file (- reads this process's stdin)")
    parser.add_argument("--server", help="server URL (default $RUNFLARE_URL, else http://127.0.0.1:8787)")
    parser.add_argument("--token", help="X-Auth-Token (default $RUNFLARE_AUTH_TOKEN)")
    parser.add_argument("--json", action="store_true", help="print the final submission as JSON")
    parser.add_argument("--args", help="command line arguments of the program")
    parser.add_argument("--time-limit", type=float, help="CPU time limit, seconds")
    parser.add_argument("--memory-limit", type=int, help="memory limit, KB")
    return parser


def exit_code_for(submission: dict[str, Any]) -> int:
    """The program's exit code; 124 on a time limit; 1 for other failures without one."""
    status = (submission.get("status") or {}).get("id")
    if status == 5:
        return EXIT_TIME_LIMIT
    if isinstance(submission.get("exit_code"), int) and (submission["exit_code"] or status in (3, 4, 11)):
        return submission["exit_code"]
    return 0 if status in (3, 4) else EXIT_FAILURE


class StatusLine:
    """A spinner with the current status on stderr, drawn only when stderr is a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.text = "Submitting"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._active = False

    def start(self) -> None:
        if self.enabled:
            self._thread.start()

    def set(self, text: str, spinning: bool) -> None:
        with self._lock:
            self.text = text
            self._active = spinning
            if not spinning:
                self._clear()

    def write(self, out: TextIO, text: str) -> None:
        """Write program output without tearing the status line."""
        with self._lock:
            self._clear()
            out.write(text)
            out.flush()

    def _clear(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def _spin(self) -> None:
        for frame in itertools.cycle(SPINNER):
            if self._stop.wait(0.1):
                return
            with self._lock:
                if self._active:
                    self.stream.write(f"\r\033[K{frame} {self.text}")
                    self.stream.flush()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._clear()


def _stdin_value(value: str | None) -> str | None:
    if value == "-":
        return sys.stdin.read()
    if value is not None and value.startswith("@"):
        return Path(value[1:]).expanduser().read_text()
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``runflare run``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"] and not Path("run").is_file():
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    path = Path(args.file)
    try:
        source = path.read_text()
        stdin = _stdin_value(args.stdin)
    except OSError as exc:
        print(f"runflare: {exc}", file=sys.stderr)
        return EXIT_USAGE
    language = args.language or guess_from_filename(path.name)
    if language is None:
        print(f"runflare: cannot guess the language of {path.name}; use --language", file=sys.stderr)
        return EXIT_USAGE
    client = Client(args.server, args.token)
    status = StatusLine(sys.stderr)
    status.start()
    try:
        token = client.submit(source, language, stdin=stdin, cpu_time_limit=args.time_limit,
                              memory_limit=args.memory_limit, command_line_arguments=args.args)
        status.set("In Queue", spinning=True)
        for event in client.stream(token):
            _show(event, status, quiet=args.json)
        submission = client.get(token)
    except RunflareError as exc:
        status.stop()
        print(f"runflare: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        status.stop()
        return 130
    status.stop()
    try:
        _summarise(submission, args.json)
    except BrokenPipeError:  # `runflare run x.py --json | head`
        sys.stdout = None  # type: ignore[assignment]  # nothing left to flush at exit
    return exit_code_for(submission)


def _show(event: dict[str, Any], status: StatusLine, quiet: bool) -> None:
    kind = event.get("type")
    if kind == "progress_update":
        stream = event.get("stream")
        if stream in ("stdout", "stderr"):
            if not quiet:
                status.write(sys.stdout if stream == "stdout" else sys.stderr, event.get("text", ""))
        elif event.get("stage") and not event.get("display"):
            stage = event["stage"]
            status.set(stage.capitalize(), spinning=stage in ("queued", "starting", "compiling"))
    elif kind == "status_update":
        name = (event.get("status") or {}).get("name", "")
        status.set(name, spinning=(event.get("status") or {}).get("id") == 1)


def _summarise(submission: dict[str, Any], as_json: bool) -> None:
    if as_json:
        json.dump(submission, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    status = submission.get("status") or {}
    if status.get("id") == 6 and submission.get("compile_output"):
        sys.stderr.write(submission["compile_output"])
    if status.get("id") not in (3, 4, 11, None) and submission.get("message"):
        print(f"runflare: {submission['message']}", file=sys.stderr)
    if sys.stderr.isatty() or status.get("id") not in (3, 4, 11):
        parts = [str(status.get("description", "?"))]
        if submission.get("time") is not None:
            parts.append(f"{submission['time']} s")
        if submission.get("memory") is not None:
            parts.append(f"{submission['memory']} KB")
        print(f"[{' · '.join(parts)}]", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
