"""A live view of one submission, built from stock ipywidgets (HTML, Output, VBox) and updated
from a background thread that follows the submission's event stream."""

from __future__ import annotations

import contextvars
import html
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import ipywidgets as widgets

from .client import Client
from .errors import RunflareError

COLOURS = {1: "#6c757d", 2: "#0d6efd", 3: "#198754", 4: "#fd7e14", 5: "#6f42c1", 6: "#b35900",
           13: "#212529"}
ERROR_COLOUR = "#dc3545"
TICK = 0.25  # seconds between refreshes of the elapsed time and of buffered output
FLUSH = 0.1  # output arriving faster than this is batched into one widget update
MAX_CONSOLE = 256 * 1024  # characters of stdout+stderr kept on screen (the submission keeps all)


def status_colour(status_id: int | None) -> str:
    """Badge colour for a status id (red for runtime errors, grey when unknown)."""
    if status_id is None:
        return "#adb5bd"
    return COLOURS.get(status_id, ERROR_COLOUR)


def _fmt_memory(kb: Any) -> str:
    return f"{kb / 1024:.1f} MB" if isinstance(kb, (int, float)) else "–"


def _capture_parent() -> Any:
    """The parent message of the cell running now (ipykernel), or None outside a kernel."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency of ipywidgets
        return None
    ip = get_ipython()
    get_parent = getattr(ip, "get_parent", None)
    return get_parent() if get_parent else None


def _adopt_parent(parent: Any) -> None:
    """Route this thread's messages to the cell that started it (needed under ipykernel 7)."""
    if parent is None:
        return
    from IPython import get_ipython

    ip = get_ipython()
    setter = getattr(ip, "set_thread_parent", None) or getattr(ip, "set_parent", None)
    if setter is not None:
        setter(parent)


class SubmissionWidget(widgets.VBox):
    """Status badge, stage and elapsed time; stdout/stderr as they arrive; rich outputs; and at
    the end time, memory and exit code. ``submission`` holds the final submission dict."""

    def __init__(self, title: str = "", interactive: bool = False) -> None:
        self.title = title
        self.header = widgets.HTML()
        self.console = widgets.Output(layout=widgets.Layout(max_height="30em", overflow="auto"))
        self.rich = widgets.Output()
        self.footer = widgets.HTML()
        children: list[widgets.Widget] = [self.header, self.console]
        self.stdin_box: widgets.Text | None = None
        if interactive:
            self.stdin_box = widgets.Text(placeholder="standard input: Enter sends a line",
                                          continuous_update=False, layout=widgets.Layout(width="60%"))
            self.stdin_box.observe(self._on_stdin, names="value")
            eof = widgets.Button(description="Send EOF", tooltip="close the program's standard input")
            eof.on_click(lambda _: self.send_stdin("", eof=True))
            self.input_row = widgets.HBox([self.stdin_box, eof])
            self.input_row.add_class("runflare-stdin")
            children.append(self.input_row)
        super().__init__([*children, self.rich, self.footer])
        self.add_class("runflare-widget")
        self._client: Client | None = None
        self._unsent: list[tuple[str, str]] = []
        self._flushed = 0.0
        self._trimmed = False
        self._running = False
        self._pending: list[tuple[str, bool]] = []
        self.token: str | None = None
        self.status_id: int | None = None
        self.status_name = "Submitting"
        self.stage = ""
        self.error: str | None = None
        self.submission: dict[str, Any] | None = None
        self.events: list[dict[str, Any]] = []
        self._started = time.monotonic()
        self._elapsed: float | None = None
        self._lock = threading.RLock()
        self._done = threading.Event()
        self._callbacks: list[Callable[[SubmissionWidget], None]] = []
        self._render()

    # -- rendering ---------------------------------------------------------------------------
    def _render(self) -> None:
        with self._lock:
            elapsed = self._elapsed if self._elapsed is not None else time.monotonic() - self._started
            colour = ERROR_COLOUR if self.error else status_colour(self.status_id)
            label = "Error" if self.error else self.status_name
            parts = [
                f'<span class="runflare-badge" data-status-id="{self.status_id or ""}" '
                f'style="background:{colour};color:#fff;padding:2px 10px;border-radius:10px;'
                f'font-weight:600">{html.escape(label)}</span>'
            ]
            if self.title:
                parts.append(f'<b class="runflare-title">{html.escape(self.title)}</b>')
            if self.stage and not self.finished:
                parts.append(f'<span class="runflare-stage">{html.escape(self.stage)}</span>')
            parts.append(f'<span class="runflare-elapsed">{elapsed:.1f} s</span>')
            header = "&nbsp;&nbsp;".join(parts)
            if self.error:
                header += f'<div class="runflare-error" style="color:{ERROR_COLOUR}">{html.escape(self.error)}</div>'
            self.header.value = header

    def _render_footer(self, sub: dict[str, Any]) -> None:
        items = [
            ("time", f"{sub['time']} s" if sub.get("time") is not None else "–"),
            ("memory", _fmt_memory(sub.get("memory"))),
            ("exit code", "–" if sub.get("exit_code") is None else str(sub["exit_code"])),
        ]
        if sub.get("exit_signal") is not None:
            items.append(("signal", str(sub["exit_signal"])))
        text = " · ".join(f"{k} <b>{html.escape(v)}</b>" for k, v in items)
        if sub.get("message"):
            text += f'<div class="runflare-message">{html.escape(str(sub["message"]))}</div>'
        self.footer.value = f'<div class="runflare-footer" style="color:#555">{text}</div>'

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    # -- updates -----------------------------------------------------------------------------
    def apply(self, event: dict[str, Any]) -> None:
        """Update the view from one stream event."""
        self.events.append(event)
        kind = event.get("type")
        if kind == "status_update":
            status = event.get("status") or {}
            self.status_id = status.get("id", self.status_id)
            self.status_name = status.get("name") or status.get("description") or self.status_name
            data = event.get("data") or {}
            if self.status_id == 6 and data.get("compile_output"):
                self.write("stderr", data["compile_output"])
        elif kind == "progress_update":
            if event.get("stream") == "stdout":
                self.write("stdout", event.get("text", ""))
            elif event.get("stream") == "stderr":
                self.write("stderr", event.get("text", ""))
            elif event.get("display") is not None:
                display = event["display"]
                self.rich.outputs = (*self.rich.outputs, {
                    "output_type": "display_data", "data": display.get("data", {}),
                    "metadata": display.get("metadata", {})})
            elif event.get("stage"):
                self.stage = event["stage"]
                if self.stage == "running" and not self._running:
                    self._running = True
                    self._flush_stdin()
        elif kind == "error":
            self.write("stderr", f"[server] {event.get('error', '')} {event.get('details', '')}\n")
        self._render()

    # -- console -----------------------------------------------------------------------------
    def write(self, name: str, text: str) -> None:
        """Queue program output for the console; sent at once unless output is arriving fast."""
        if not text:
            return
        with self._lock:
            self._unsent.append((name, text))
            if time.monotonic() - self._flushed >= FLUSH:
                self.flush()

    def flush(self) -> None:
        """Send queued output to the console: one widget update, consecutive chunks merged,
        the oldest output trimmed past MAX_CONSOLE characters."""
        with self._lock:
            if not self._unsent:
                return
            outputs = [dict(o) for o in self.console.outputs[1 if self._trimmed else 0:]]
            for name, text in self._unsent:
                if outputs and outputs[-1]["name"] == name:
                    outputs[-1]["text"] += text
                else:
                    outputs.append({"output_type": "stream", "name": name, "text": text})
            self._unsent = []
            excess = sum(len(o["text"]) for o in outputs) - MAX_CONSOLE
            while excess > 0 and outputs:
                self._trimmed = True
                first = outputs[0]
                if len(first["text"]) <= excess:
                    excess -= len(outputs.pop(0)["text"])
                else:
                    rest = first["text"][excess:]
                    first["text"] = rest[rest.find("\n") + 1:] if "\n" in rest else rest  # whole lines
                    excess = 0
            if self._trimmed:
                outputs.insert(0, {"output_type": "stream", "name": "stderr", "text": "[earlier output trimmed]\n"})
            self.console.outputs = tuple(outputs)
            self._flushed = time.monotonic()

    # -- interactive standard input ---------------------------------------------------------
    def _on_stdin(self, change: dict[str, Any]) -> None:
        if change["new"]:
            self.send_stdin(change["new"] + "\n")
            assert self.stdin_box is not None
            self.stdin_box.value = ""

    def send_stdin(self, data: str, eof: bool = False) -> None:
        """Feed the program's standard input (an ``interactive`` submission); kept until it runs."""
        with self._lock:
            self._pending.append((data, eof))
            if self._running:
                self._flush_stdin()

    def _flush_stdin(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            for data, eof in pending:
                try:
                    if self._client is not None and self.token is not None:
                        self._client.send_stdin(self.token, data, eof)
                except RunflareError as exc:
                    self.write("stderr", f"[stdin not sent: {exc}]\n")

    def show_error(self, message: str) -> None:
        """Show a failure of the client (server unreachable, rejected submission) and stop."""
        self.error = message
        self._finish_clock()
        self._render()
        self._complete()

    def finish(self, submission: dict[str, Any]) -> None:
        """Show the final submission (status, time, memory, exit code)."""
        self.submission = submission
        status = submission.get("status") or {}
        if isinstance(status, dict) and status.get("id"):
            self.status_id = status["id"]
            self.status_name = status.get("description") or self.status_name
        self._finish_clock()
        self._render_footer(submission)
        self._render()
        self._complete()

    def _finish_clock(self) -> None:
        self._elapsed = time.monotonic() - self._started

    def _complete(self) -> None:
        self.flush()
        self._done.set()
        if self.stdin_box is not None:
            self.input_row.layout.display = "none"
        self._render()
        for callback in self._callbacks:
            callback(self)

    def on_finish(self, callback: Callable[[SubmissionWidget], None]) -> None:
        """Call ``callback(widget)`` once the submission is finished (or failed)."""
        self._callbacks.append(callback)
        if self._done.is_set():
            callback(self)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until finished; False on timeout."""
        return self._done.wait(timeout)

    # -- following ---------------------------------------------------------------------------
    def follow(self, client: Client, token: str) -> threading.Thread:
        """Follow ``token`` in a background thread that updates this widget."""
        self.token = token
        self._client = client
        self.status_name = "In Queue"
        self._render()
        parent = _capture_parent()
        context = contextvars.copy_context()

        def run() -> None:
            _adopt_parent(parent)
            ticker = threading.Thread(target=context.copy().run, args=(self._tick, parent), daemon=True)
            ticker.start()
            try:
                for event in client.stream(token):
                    self.apply(event)
                self.finish(client.get(token))
            except RunflareError as exc:
                self.show_error(str(exc))
            except Exception as exc:  # noqa: BLE001 - shown to the user instead of lost in a thread
                self.show_error(f"{type(exc).__name__}: {exc}")

        thread = threading.Thread(target=context.run, args=(run,), daemon=True, name=f"runflare-{token[:8]}")
        thread.start()
        return thread

    def _tick(self, parent: Any) -> None:
        _adopt_parent(parent)
        ticks = 0
        while not self._done.wait(TICK):
            self.flush()
            ticks += 1
            if ticks % 2 == 0:
                self._render()


def run_widget(source: str, language: str | int | None = None, *, client: Client | None = None,
               title: str = "", wait: bool = False, **kwargs: Any) -> SubmissionWidget:
    """Submit ``source`` and return a widget following it (``wait=True``: once it is finished).

    ``kwargs`` go to :meth:`Client.submit` (stdin, expected_output, cpu_time_limit, interactive ...);
    ``interactive=True`` adds an input box that feeds the program's standard input.
    """
    client = client or Client()
    view = SubmissionWidget(title, interactive=bool(kwargs.get("interactive")))
    try:
        token = client.submit(source, language, **kwargs)
    except RunflareError as exc:
        view.show_error(str(exc))
        return view
    view.follow(client, token)
    if wait:
        view.wait()
    return view


def wait_all(views: Iterable[SubmissionWidget], timeout: float | None = None) -> bool:
    """Block until every widget is finished; False if the timeout ran out first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for view in views:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not view.wait(left):
            return False
    return True
