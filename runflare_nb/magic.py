"""The ``%runflare`` line magic and ``%%runflare`` cell magic."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from .client import Client
from .errors import RunflareError
from .languages import guess_from_filename
from .widget import SubmissionWidget


def read_at(value: str | None) -> str | None:
    """``@path`` reads a file; anything else is the text itself."""
    if value is None or not value.startswith("@"):
        return value
    try:
        return Path(value[1:]).expanduser().read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {value[1:]}: {exc}") from None


@magics_class
class RunflareMagics(Magics):
    """Run code on a Run-Flare server and follow it live."""

    @magic_arguments()
    @argument("-l", "--language", help="python, c++, js, c, java, rust, go ... or a Judge0 id (1071: IPython kernel)")
    @argument("--stdin", help="standard input: text, or @file")
    @argument("--expected", help="expected output (status Accepted or Wrong Answer): text, or @file")
    @argument("--time-limit", type=float, help="CPU time limit, seconds")
    @argument("--memory-limit", type=int, help="memory limit, KB")
    @argument("--args", help="command line arguments of the program")
    @argument("--kernel", help="run on this kernelspec (a kernel run)")
    @argument("--server", help="server URL (default $RUNFLARE_URL, else http://127.0.0.1:8787)")
    @argument("--token", help="X-Auth-Token (default $RUNFLARE_AUTH_TOKEN)")
    @argument("--no-widget", action="store_true", help="print plain text and block (for scripts)")
    @argument("--wait", action="store_true", help="block until the submission is finished")
    @argument("--var", metavar="NAME", help="store the final submission dict in this variable")
    @argument("--interactive", action="store_true",
              help="type the program's standard input in the widget while it runs")
    @line_cell_magic
    def runflare(self, line: str, cell: str | None = None) -> Any:
        """Submit code to Run-Flare and show a live widget.

        Line form: ``%runflare [options] FILE_OR_ONE_LINE_OF_CODE``; cell form: ``%%runflare [options]``
        followed by the program. The language is guessed from a file's extension, else Python.
        """
        args, rest = parse_line(self.runflare.parser, line)
        source, filename = self._source(rest, cell)
        if args.var is not None and not args.var.isidentifier():
            raise UsageError(f"--var needs a Python identifier, not {args.var!r}")
        if args.interactive and (args.wait or args.no_widget):
            raise UsageError("--interactive needs the widget to type into: drop --wait / --no-widget")
        language: str | int | None = args.language
        if language is None and args.kernel is None:
            language = (filename and guess_from_filename(filename)) or 71
        client = Client(args.server, args.token)
        options = {
            "stdin": read_at(args.stdin), "expected_output": read_at(args.expected), "kernel": args.kernel,
            "cpu_time_limit": args.time_limit, "memory_limit": args.memory_limit,
            "command_line_arguments": args.args,
        }
        if args.no_widget:
            return self._run_plain(client, source, language, options, args.var)
        view = SubmissionWidget(filename or "", interactive=args.interactive)
        if args.interactive:
            options["interactive"] = True
            typed_ahead = options.pop("stdin")
            if typed_ahead:  # sent, as whole lines, once the program runs
                view.send_stdin(typed_ahead if typed_ahead.endswith("\n") else typed_ahead + "\n")
        if args.var:
            view.on_finish(lambda w: self.shell.user_ns.__setitem__(args.var, w.submission))
        try:
            token = client.submit(source, language, **options)
        except RunflareError as exc:
            view.show_error(str(exc))
            return view
        view.follow(client, token)
        if args.wait:
            view.wait()
        return view

    def _source(self, rest: str, cell: str | None) -> tuple[str, str | None]:
        if cell is not None:
            return cell, None
        text = rest.strip()
        if not text:
            raise UsageError("%runflare needs a file or a line of code (or use %%runflare for a cell)")
        candidate = Path(text).expanduser()
        if "\n" not in text and len(text) < 4096 and candidate.is_file():
            return candidate.read_text(), candidate.name
        if re.fullmatch(r"[\w./~-]+", text) and guess_from_filename(text) is not None:
            raise UsageError(f"no such file: {text}")
        return text, None

    def _run_plain(self, client: Client, source: str, language: str | int | None, options: dict[str, Any],
                   var: str | None) -> None:
        try:
            token = client.submit(source, language, **options)
            for event in client.stream(token):
                if event.get("type") == "progress_update" and event.get("stream") in ("stdout", "stderr"):
                    out = sys.stdout if event["stream"] == "stdout" else sys.stderr
                    out.write(event.get("text", ""))
                    out.flush()
            submission = client.get(token)
        except RunflareError as exc:
            print(f"runflare: {exc}", file=sys.stderr)
            return None
        if var:
            self.shell.user_ns[var] = submission
        status = submission.get("status") or {}
        if submission.get("compile_output") and status.get("id") == 6:
            print(submission["compile_output"], file=sys.stderr)
        summary = [str(status.get("description", "?"))]
        if submission.get("time") is not None:
            summary.append(f"time {submission['time']} s")
        if submission.get("memory") is not None:
            summary.append(f"memory {submission['memory']} KB")
        if submission.get("exit_code") is not None:
            summary.append(f"exit code {submission['exit_code']}")
        print(f"[{' · '.join(summary)}]")
        return None


def _value_options(parser: Any) -> set[str]:
    return {opt for action in parser._actions if action.nargs != 0 for opt in action.option_strings}


def parse_line(parser: Any, line: str) -> tuple[Any, str]:
    """Split ``line`` into options (parsed by ``parser``) and the raw rest (code or a file name,
    kept verbatim so its quotes survive)."""
    takes_value = _value_options(parser)
    tokens: list[str] = []
    rest = line
    while True:
        rest = rest.lstrip()
        if not rest.startswith("-"):
            break
        lexer = shlex.shlex(rest, posix=True)
        lexer.whitespace_split = True
        lexer.commenters = ""
        try:
            option = lexer.get_token()
            if option == "--":
                rest = rest[lexer.instream.tell():]
                break
            value = lexer.get_token() if option in takes_value else None
        except ValueError as exc:
            raise UsageError(f"cannot parse options: {exc}") from None
        if not option.startswith("--") and option[1:2].isdigit():
            break  # "-1" is code, not an option
        tokens.append(option)
        if value is not None:
            tokens.append(value)
        rest = rest[lexer.instream.tell():]
    return parser.parse_args(tokens), rest
