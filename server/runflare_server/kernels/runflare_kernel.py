"""The Run-Flare kernel: each execute_request compiles and runs the cell as a program in a fresh sandbox.

One kernel serves every program language. The request's ``metadata["runflare"]`` may carry::

    {"language_id": 50, "stdin": "...", "args": "a 'b c'", "compiler_options": "-O2",
     "limits": {...Limits fields...}, "redirect_stderr_to_stdout": false, "interactive": false}

Without it (e.g. from JupyterLab) the kernel's default language (``RUNFLARE_LANGUAGE``, a Judge0 id) and
default limits apply. Output streams live as iopub ``stream`` messages; when ``metadata["runflare"]`` is
present the kernel also publishes ``runflare_stage`` iopub messages ({"stage": "compiling"|"running"}).
The execute_reply's ``metadata["runflare"]`` holds the result (``ProgramResult.to_json()``: outcome,
exit code/signal, CPU time, wall time, peak memory KB, compile output, exact stdout/stderr as base64).

Interactive stdin: with ``"interactive": true`` and ``allow_stdin``, the kernel asks for the program's
input over the Jupyter stdin channel (``input_request`` with prompt ""); each ``input_reply`` value is
written to the program's stdin as is, and a reply whose ``metadata["runflare_eof"]`` is true or whose value is
"\\x04" closes it (as does the program's exit).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
from typing import Any

import zmq
from ipykernel.kernelbase import Kernel

from runflare_server.engine.interface import Limits
from runflare_server.engine.runs import languages as langs
from runflare_server.kernels.runner import Runner

_LIMIT_FIELDS = {f.name for f in dataclasses.fields(Limits)}


def _engine_metadata(parent: dict) -> dict[str, Any]:
    """What the engine put in a request's ``metadata["runflare"]`` ({} for a plain Jupyter request)."""
    return (parent.get("metadata") or {}).get("runflare") or {}


class LockedSocket:
    """The kernel's iopub socket, sent on by whichever thread publishes (the run's output and status from the
    main thread, a control request's status from the control thread), one at a time under a lock: a full
    memory barrier between threads, which is what ZeroMQ asks of a socket that changes threads."""

    def __init__(self, socket: zmq.Socket) -> None:
        self.socket = socket
        self._lock = threading.Lock()

    def send_multipart(self, parts: list[Any], *args: Any, **kwargs: Any) -> Any:
        """Send, unless the kernel already closed the socket at its shutdown (ipykernel publishes the
        shutdown request's idle status after the app's close: there is no one left to read it)."""
        with self._lock:
            if self.socket.closed:
                return None
            return self.socket.send_multipart(parts, *args, **kwargs)

    def close(self, linger: int | None = None) -> None:
        with self._lock:
            self.socket.close(linger)


class RunFlareKernel(Kernel):
    """Compiles and runs programs in fresh sandboxes; user code never runs in this process."""

    implementation = "runflare"
    implementation_version = "0.1.0"
    banner = "Run-Flare: each cell runs as a program in a fresh sandbox"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.default_language = int(os.environ.get("RUNFLARE_LANGUAGE", "71"))
        self.runner = Runner(os.environ.get("RUNFLARE_SANDBOX", "auto"), subreaper=True, ready_next=True,
                             defer_next=True)
        self._last: dict[str, Any] | None = None
        self.runs = 0
        self._execute_sleep = 0.0  # ipykernel sleeps 0.5 ms before each reply by default (for its OutStreams)

    @property
    def language_info(self) -> dict[str, Any]:  # type: ignore[override]
        lang = langs.BY_ID.get(self.default_language, langs.BY_ID[71])
        ext = os.path.splitext(lang.source_file)[1]
        name = lang.kernelspec.removeprefix("runflare-")
        return {"name": {"cpp": "c++", "sql": "sql"}.get(name, name), "file_extension": ext,
                "mimetype": "text/plain", "codemirror_mode": name}

    async def do_execute(self, code: str, silent: bool, store_history: bool = True,
                         user_expressions: dict | None = None, allow_stdin: bool = False, *,
                         cell_meta: dict | None = None, cell_id: str | None = None) -> dict:
        parent = self.get_parent("shell")
        rf = _engine_metadata(parent)
        engine_call = bool(rf)
        limits = Limits(**{k: v for k, v in (rf.get("limits") or {}).items() if k in _LIMIT_FIELDS})
        compile_limits = Limits(**{k: v for k, v in rf["compile_limits"].items() if k in _LIMIT_FIELDS}) \
            if rf.get("compile_limits") else None
        stdin = rf.get("stdin")

        def on_output(name: str, text: str) -> None:
            if not silent:
                self.send_response(self.iopub_socket, "stream", {"name": name, "text": text})

        def on_stage(stage: str) -> None:
            if engine_call:
                self.send_response(self.iopub_socket, "runflare_stage", {"stage": stage, "message": stage})

        reader = self._stdin_reader() if rf.get("interactive") and allow_stdin else None
        result = self.runner.run(
            int(rf.get("language_id") or self.default_language), code,
            stdin=stdin.encode("utf-8", "surrogateescape") if isinstance(stdin, str) else None,
            args=rf.get("args"), compiler_options=rf.get("compiler_options"), limits=limits,
            redirect_stderr=bool(rf.get("redirect_stderr_to_stdout")), on_output=on_output, on_stage=on_stage,
            stdin_reader=reader, compile_limits=compile_limits)
        if reader is not None:
            self._stdin_stop.set()
        self.runs += 1
        self._last = result.to_json()
        self._last["kernel_runs"] = self.runs
        if result.outcome == "exited" and not result.exit_code and not result.exit_signal:
            return {"status": "ok", "execution_count": self.execution_count, "payload": [], "user_expressions": {}}
        if not engine_call and not silent and result.compile_output and result.outcome == "compile_error":
            self.send_response(self.iopub_socket, "stream", {"name": "stderr", "text": result.compile_output})
        evalue = result.message or result.outcome
        if not engine_call and not silent:
            self.send_response(self.iopub_socket, "error",
                               {"ename": result.outcome, "evalue": evalue, "traceback": [evalue]})
        return {"status": "error", "execution_count": self.execution_count, "ename": result.outcome,
                "evalue": evalue, "traceback": [evalue]}

    async def execute_request(self, stream: Any, ident: Any, parent: dict) -> None:
        await super().execute_request(stream, ident, parent)
        self.runner.start_next()  # the next run's sandbox: once this run's reply is out

    def _publish_status(self, status: str, channel: str, parent: dict | None = None) -> None:
        """The engine waits for "idle" only: no "busy" for its requests (one iopub message less per run)."""
        if status == "busy" and _engine_metadata(parent or self.get_parent(channel)):
            return
        super()._publish_status(status, channel, parent)

    def _publish_execute_input(self, code: str, parent: dict, execution_count: int) -> None:
        """The engine never reads execute_input (it sent the code): one iopub message less per run."""
        if _engine_metadata(parent):
            return
        super()._publish_execute_input(code, parent, execution_count)

    def finish_metadata(self, parent: dict, metadata: dict, reply_content: dict) -> dict:
        if self._last is not None and parent.get("header", {}).get("msg_type") == "execute_request":
            metadata["runflare"], self._last = self._last, None
        return metadata

    def _stdin_reader(self):
        """Chunks of program input asked for over the stdin channel; None at end of input or when stopped."""
        parent, ident = self.get_parent("shell"), self._parent_ident["shell"]  # context vars: read them here
        self._stdin_stop = stop = threading.Event()

        def read() -> bytes | None:
            if stop.is_set():
                return None
            request = self.session.send(self.stdin_socket, "input_request", {"prompt": "", "password": False},
                                        parent, ident=ident)
            while not stop.is_set():
                rlist, _, _ = zmq.select([self.stdin_socket], [], [], 0.1)
                if not rlist:
                    continue
                _, reply = self.session.recv(self.stdin_socket)
                if reply is None or (reply.get("parent_header") or {}).get("msg_id") != request["header"]["msg_id"]:
                    continue  # a late answer to an earlier run's request: never another program's input
                value = (reply.get("content") or {}).get("value", "")
                if value == "\x04" or (reply.get("metadata") or {}).get("runflare_eof"):
                    stop.set()
                    return value.encode("utf-8", "surrogateescape") if value not in ("", "\x04") else None
                return value.encode("utf-8", "surrogateescape")
            return None

        return read

    def do_shutdown(self, restart: bool) -> dict:
        self.runner.close()  # the launchers it keeps ready, and their groups
        return {"status": "ok", "restart": restart}

    def do_is_complete(self, code: str) -> dict:
        return {"status": "complete"}


def refuse_what_handlers_drop(log: logging.Logger) -> None:
    """Raise ``log``'s level to the lowest of its handlers' (those it propagates to included), so a record
    that every handler would drop is never made. traitlets leaves an app's logger at DEBUG and filters in
    its handler: each request's ``log.debug`` lines still built LogRecords (2% of the kernel's CPU in a
    batch of program runs). A handler at NOTSET takes everything: the level is then left as it is."""
    handlers, logger = [], log
    while logger is not None:
        handlers += logger.handlers
        logger = logger.parent if logger.propagate else None
    if handlers and all(h.level > logging.NOTSET for h in handlers):
        log.setLevel(max(log.getEffectiveLevel(), min(h.level for h in handlers)))


def main() -> None:
    """Launch the kernel (``python -m runflare_server.kernels -f CONNECTION_FILE``)."""
    from ipykernel.kernelapp import IPKernelApp
    from traitlets import default

    from runflare_server.engine.jupyter.lean_session import LeanSession
    from runflare_server.engine.sandbox.process import private_runs_mount

    class RunFlareKernelApp(IPKernelApp):
        """IPKernelApp less what serves user code in the kernel's own process, which this kernel never
        runs: no shell-channel thread for subshells (each request took two more hops between threads) and
        no OutStream for sys.stdout/stderr (each request flushed them four times, a round trip to the iopub
        thread each), and no IOPub thread: a message goes out from the thread that publishes it (the IOPub
        thread's wake-up held each chunk of output back 0.3 ms at p50, 1.5 ms at p90). Its requests are
        decoded without date parsing (``LeanSession``: ipykernel reads no header date)."""

        @default("session")
        def _lean_session(self) -> LeanSession:
            return LeanSession(parent=self)

        def init_sockets(self) -> None:
            super().init_sockets()
            self.shell_channel_thread = None

        def init_iopub(self, context: zmq.Context) -> None:
            # PUB, as before ipykernel 7's XPUB: nothing reads subscriptions here to send iopub_welcome
            socket = context.socket(zmq.PUB)
            socket.linger = 1000
            self.iopub_port = self._bind_socket(socket, self.iopub_port)
            self.iopub_thread = None
            self.iopub_socket = LockedSocket(socket)

        def initialize(self, argv: list[str] | None = None) -> None:
            super().initialize(argv)
            refuse_what_handlers_drop(self.log)

        def close(self) -> None:
            self.iopub_socket.close()  # first: the base's close ends by terminating the context
            super().close()

    if os.environ.get("RUNFLARE_SANDBOX", "auto") != "none":
        private_runs_mount()  # first: unshare needs a process with no other thread yet
    RunFlareKernelApp.launch_instance(kernel_class=RunFlareKernel, outstream_class=None)


if __name__ == "__main__":
    sys.exit(main())
