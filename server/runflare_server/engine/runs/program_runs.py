"""Program runs: a pool of long-lived Run-Flare kernels, each able to run any program language.

A run takes an idle kernel, sends one execute_request (the program as code; language, stdin, argv,
compiler options and limits in ``metadata["runflare"]``), forwards the kernel's iopub ``stream`` and
``runflare_stage`` messages as engine events while the program runs, and builds the ``RunResult`` from
the execute_reply's ``metadata["runflare"]``. User code never runs in the kernels (each program is a
fresh sandboxed process), so kernels are reused; they are replaced when they die and recycled after
``recycle_after`` runs (a kernel's memory grows by about 1 KiB a run; its successor starts during its
last run): the engine's one ``kernel_pool.Pool``, with that reuse policy.

Kernel messages are bounded before they are decoded (``bounded_client``: 4x the output cap + 64 KiB per
frame); a larger one cuts the channel undecoded, the run ends as an internal error saying so, and the
kernel is replaced. Internal failures reach the submitter as a generic message with an incident id (the
log has the details). The pool's dirs are ``scratch.private_dir`` dirs, swept if the server is killed.

Lifecycle: the Run-Flare kernels start through ``AsyncKernelManager`` with a provisioner named in their
kernelspec's metadata, as kernel runs' kernels do (``runflare-sandbox``). That provisioner is jupyter_client's
own ``LocalProvisioner`` (``local-provisioner``), on purpose: a Run-Flare kernel never runs user code, it
builds each program's sandbox (bubblewrap as root, a leased uid, a cgroup per run), so it cannot sit inside
the kernel sandbox, and a "host mode" of ``runflare-sandbox`` would make that provisioner's name mean "not
sandboxed" for some configs. Naming LocalProvisioner keeps ``runflare-sandbox`` "bubblewrap or not at all"
and weakens nothing: the kernel is the server's own trusted process, on ipc sockets in a private dir.

Interactive runs (``request.stdin_queue``): the kernel asks for input over the stdin channel; each
``input_request`` is answered with the next chunk from the queue, ``None`` from the queue ends the input.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import inspect
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import AsyncKernelManager

from runflare_server.engine.incidents import has_host_detail, incident, shown_or_incident
from runflare_server.engine.interface import Emit, LanguageInfo, RunRequest, RunResult
from runflare_server.engine.jupyter.bounded_client import BoundedKernelClient, message_bound
from runflare_server.engine.jupyter.kernel_pool import Pool
from runflare_server.engine.jupyter.kernelspecs import StaticKernelSpecManager
from runflare_server.engine.jupyter.lean_session import LeanSession
from runflare_server.engine.runs import languages
from runflare_server.engine.sandbox import cgroups, policy, scratch
from runflare_server.engine.sandbox import process as sandbox

log = logging.getLogger(__name__)
REPLY_GRACE = 30.0  # seconds past the run's own limits before a kernel is declared stuck
KERNEL_NAME = "runflare"
HOST_PROVISIONER = "local-provisioner"  # jupyter_client's LocalProvisioner, named, not defaulted (see above)


def _kernel_specs() -> StaticKernelSpecManager:
    """The one kernelspec program runs start: the Run-Flare kernel of this interpreter (never an installed
    spec of that name), naming its provisioner explicitly (see the module docstring)."""
    spec = KernelSpec(argv=[sys.executable, "-m", "runflare_server.kernels", "-f", "{connection_file}"],
                      display_name="Run-Flare", language="runflare", env={},
                      metadata={"kernel_provisioner": {"provisioner_name": HOST_PROVISIONER, "config": {}}})
    return StaticKernelSpecManager({KERNEL_NAME: spec})


@dataclasses.dataclass(eq=False)
class _Kernel:
    """A Run-Flare kernel of the pool: its manager and client."""

    km: AsyncKernelManager
    kc: Any

    def alive(self) -> bool:
        """Whether its process still runs (LocalProvisioner's public ``process``)."""
        process = getattr(self.km.provisioner, "process", None)
        return process is not None and process.poll() is None

    async def shutdown(self) -> None:
        """Ask it to shut down, kill it if it does not within 10 s."""
        with contextlib.suppress(Exception):
            self.kc.stop_channels()
        try:
            await asyncio.wait_for(self.km.shutdown_kernel(now=False), 10)
        except Exception:  # noqa: BLE001
            with contextlib.suppress(Exception):
                await self.km.shutdown_kernel(now=True)


class ProgramRuns:
    """The program-run engine: ``await start()``, ``await run(request, emit)``, ``await stop()``."""

    KERNEL_WAIT = 120.0  # seconds a run waits for a free kernel before it is an internal error

    def __init__(self, size: int | None = None, *, sandbox_mode: str = "auto", recycle_after: int = 1000,
                 runs_dir: str | None = None, kernel_env: dict[str, str] | None = None,
                 max_output_bytes: int | None = None) -> None:
        self.max_message_bytes = message_bound(max_output_bytes)
        self.size = max(1, size or os.cpu_count() or 1)
        self.sandbox_mode = sandbox_mode
        self.recycle_after = recycle_after
        self.runs_dir = runs_dir
        self.kernel_env = kernel_env or {}
        self._pool: Pool[_Kernel] = Pool(KERNEL_NAME, self._start_kernel, self.size, reuse=recycle_after)
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False
        self._ipc_dir: str | None = None
        self._own_runs_dir: str | None = None
        self._languages: list[LanguageInfo] = []
        self.mode = ""
        self._runs = 0

    async def start(self) -> None:
        """Detect languages and sandbox, start the kernel pool (in parallel)."""
        loop = asyncio.get_running_loop()
        self.mode = await loop.run_in_executor(None, sandbox.resolve_mode, self.sandbox_mode)
        self._languages = await loop.run_in_executor(None, languages.language_infos)
        await loop.run_in_executor(None, cgroups.mechanism)
        self._pool = Pool(KERNEL_NAME, self._start_kernel, self.size, reuse=self.recycle_after,
                          starts=asyncio.Semaphore(self.size))
        await self._pool.start()
        if not await self._pool.wait_settled():
            await self._pool.stop()
            raise RuntimeError(f"no Run-Flare kernel could start: {self._pool.stats['last_error']}")

    async def stop(self) -> None:
        """Shut every kernel down; nothing is left running."""
        self._stopping = True
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._pool.stop()
        for d in (self._ipc_dir, self._own_runs_dir):
            if d:
                shutil.rmtree(d, ignore_errors=True)
        self._ipc_dir = None
        if self._own_runs_dir:
            self.runs_dir = self._own_runs_dir = None

    def languages(self) -> list[LanguageInfo]:
        """Program languages available on this host."""
        return list(self._languages)

    def kernelspecs(self) -> list[str]:
        """Program runs are chosen by language id, not by kernelspec."""
        return []

    def health(self) -> dict[str, Any]:
        """Pool state and the sandbox / limit mechanisms in force."""
        return {"kernels": len(self._pool.kernels), "idle": self._pool.health()["ready"], "sandbox": self.mode,
                "limits": cgroups.mechanism(), "languages": [lang.id for lang in self._languages], **self.stats}

    async def run(self, request: RunRequest, emit: Emit) -> RunResult:
        """Run one submission on an idle kernel; never raises for the program's failures."""
        if self._stopping:
            return RunResult("internal", message="engine is stopping")
        if request.language_id not in {lang.id for lang in self._languages}:
            return RunResult("internal", message=f"language {request.language_id} is not available")
        await _emit(emit, {"kind": "stage", "stage": "starting", "message": "waiting for a kernel"})
        try:
            kernel = await asyncio.wait_for(self._pool.acquire(), self.KERNEL_WAIT)
        except asyncio.TimeoutError:
            return RunResult("internal", message=f"no Run-Flare kernel became free within {self.KERNEL_WAIT:.0f} s")
        healthy = False
        try:
            result, healthy = await self._execute(kernel, request, emit)
            return result
        except Exception as e:  # noqa: BLE001 - a failed kernel is an internal error, never a crash
            return RunResult("internal", message=incident(log, "the program run failed on the server", exc=e,
                                                          detail=request.token))
        finally:
            self._runs += 1
            await self._pool.release(kernel, healthy and not self._stopping)  # a shutdown runs in the background

    async def _execute(self, kernel: _Kernel, request: RunRequest, emit: Emit) -> tuple[RunResult, bool]:
        kc = kernel.kc
        limits = request.limits
        meta = {"runflare": {
            "language_id": request.language_id, "stdin": request.stdin, "args": request.command_line_arguments,
            "compiler_options": request.compiler_options, "limits": dataclasses.asdict(limits),
            "compile_limits": dataclasses.asdict(request.compile_limits) if request.compile_limits else None,
            "redirect_stderr_to_stdout": request.redirect_stderr_to_stdout,
            "interactive": request.stdin_queue is not None, "token": request.token}}
        msg_id = kc.execute_with(request.source_code, meta, allow_stdin=request.stdin_queue is not None,
                                 stop_on_error=False)
        compile_wall = request.compile_limits.wall_time_limit if request.compile_limits else 20.0
        budget = limits.wall_time_limit + compile_wall + REPLY_GRACE
        deadline = time.monotonic() + budget
        feeder = self._spawn(self._feed_stdin(kc, msg_id, request.stdin_queue)) if request.stdin_queue else None
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return RunResult("internal", message="the kernel did not answer in time"), False
                try:
                    m = await kc.next_msg("iopub", min(left, 1.0))
                except Exception:  # noqa: BLE001 - TimeoutError: no message yet; or the channel failed
                    lost = await self._lost(kernel, request)
                    if lost:
                        return lost, False
                    continue
                if m["parent_header"].get("msg_id") != msg_id:
                    continue
                mtype, c = m["msg_type"], m["content"]
                if mtype == "stream":
                    await _emit(emit, {"kind": "stream", "stream": c["name"], "text": c["text"]})
                elif mtype == "runflare_stage":
                    await _emit(emit, {"kind": "stage", "stage": c["stage"], "message": c.get("message", "")})
                elif mtype == "status" and c.get("execution_state") == "idle":
                    break
            while True:
                try:
                    reply = await kc.next_msg("shell", 1.0)
                except Exception:  # noqa: BLE001 - TimeoutError: no reply yet
                    lost = await self._lost(kernel, request)
                    if lost:
                        return lost, False
                    if time.monotonic() > deadline:
                        return RunResult("internal", message="the kernel did not answer in time"), False
                    continue
                if reply["parent_header"].get("msg_id") == msg_id:
                    break
        finally:
            if feeder:
                feeder.cancel()
        rf = reply["metadata"].get("runflare")
        if not rf:
            return RunResult("internal", message="the kernel sent no result"), True
        return self._public(_to_result(rf)), True

    async def _lost(self, kernel: _Kernel, request: RunRequest) -> RunResult | None:
        """Why the run can no longer be followed (a channel cut by an oversized message, the kernel's
        death), or None while it can."""
        refused = kernel.kc.refused()
        if refused:
            log.warning("program run %s: the Run-Flare kernel sent a %s message over %d bytes; kernel replaced",
                        request.token, refused, kernel.kc.max_message_bytes)
            return RunResult("internal", message=f"kernel output message exceeded {kernel.kc.max_message_bytes} bytes")
        if not await kernel.km.is_alive():
            return RunResult("internal", message="the kernel died")
        return None

    def _public(self, result: RunResult) -> RunResult:
        """The result as a submitter may see it: a host failure the kernel reports becomes an incident, and
        the run's host work dir (visible in compiler messages without bwrap) reads as /box."""
        if self.runs_dir:
            workdir = re.compile(re.escape(self.runs_dir.rstrip("/")) + r"/[0-9a-f]{32}")
            if result.compile_output:
                result.compile_output = workdir.sub("/box", result.compile_output)
            if result.message:
                result.message = workdir.sub("/box", result.message)
        if result.outcome == "internal":
            result.message = shown_or_incident(log, "the program run failed on the server", result.message)
        elif has_host_detail(result.message):
            result.message = incident(log, "the program run failed on the server", detail=result.message)
        return result

    async def _feed_stdin(self, kc: Any, msg_id: str, queue: asyncio.Queue[str | None]) -> None:
        """Answer the kernel's input_requests for this run from the queue."""
        while True:
            m = await kc.next_msg("stdin")
            if m["msg_type"] != "input_request" or m["parent_header"].get("msg_id") != msg_id:
                continue
            chunk = await queue.get()
            reply = kc.session.msg("input_reply", {"value": chunk or ""}, parent=m,
                                   metadata={"runflare_eof": chunk is None})
            kc.stdin_channel.send(reply)
            if chunk is None:
                return

    async def _start_kernel(self) -> _Kernel:
        env = {k: v for k, v in os.environ.items() if k != "JPY_PARENT_PID"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (policy.SERVER_DIR, env.get("PYTHONPATH")) if p)
        env["RUNFLARE_SANDBOX"] = self.mode or self.sandbox_mode
        if not self.runs_dir:  # a private runs dir, removed on stop (even what a crashed kernel left)
            self.runs_dir = self._own_runs_dir = str(scratch.private_dir("pool", sandbox.runs_root()))
        env["RUNFLARE_RUNS_DIR"] = self.runs_dir
        env.update(self.kernel_env)
        # IPC transport: socket files in a private dir, no TCP port reachable from the host's network.
        # Connection files there too (not jupyter's default /tmp/tmpXXXX.json); swept if the server is killed.
        if self._ipc_dir is None:
            self._ipc_dir = str(scratch.private_dir("ipc", Path(tempfile.gettempdir())))
        name = os.path.join(self._ipc_dir, uuid.uuid4().hex[:12])
        km = AsyncKernelManager(transport="ipc", ip=name, connection_file=name + ".json",
                                client_factory=BoundedKernelClient, kernel_name=KERNEL_NAME,
                                kernel_spec_manager=_kernel_specs(), session=LeanSession())
        kc = None
        try:  # a start cancelled halfway (the pool stopping) leaves no kernel running
            await km.start_kernel(env=env)
            kc = km.client(max_message_bytes=self.max_message_bytes)
            kc.start_channels()
            await kc.wait_for_ready(timeout=60)
        except BaseException:
            if kc is not None:
                kc.stop_channels()
            if km.has_kernel:
                await asyncio.shield(km.shutdown_kernel(now=True))
            raise
        return _Kernel(km, kc)

    @property
    def stats(self) -> dict[str, int]:
        """Runs served, kernels started, kernels replaced (dead, unhealthy after a run, or recycled)."""
        pool = self._pool.stats
        return {"runs": self._runs, "kernels_started": pool["started"],
                "kernels_replaced": pool["replaced"] + pool["recycled"]}

    @property
    def _all(self) -> list[_Kernel]:
        """Every Run-Flare kernel of the pool, idle or busy."""
        return self._pool.kernels

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


async def _emit(emit: Emit, event: dict[str, Any]) -> None:
    r = emit(event)
    if inspect.isawaitable(r):
        await r


def _to_result(rf: dict[str, Any]) -> RunResult:
    """The RunResult of the kernel's reply metadata (exact output bytes, kept as surrogateescape)."""
    def text(key: str) -> str:
        return base64.b64decode(rf.get(key) or "").decode("utf-8", "surrogateescape")

    return RunResult(outcome=rf["outcome"], stdout=text("stdout_b64"), stderr=text("stderr_b64"),
                     compile_output=rf.get("compile_output"), exit_code=rf.get("exit_code"),
                     exit_signal=rf.get("exit_signal"), time=rf.get("time"), wall_time=rf.get("wall_time"),
                     memory=rf.get("memory"), message=rf.get("message"))


class BlockingProgramRuns:
    """A ``ProgramRuns`` on its own event-loop thread, for synchronous callers (CLI, tests, benchmarks).

    ``with BlockingProgramRuns(size=2) as pr: result, events = pr.run(RunRequest(...))``
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import threading

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="runflare-program-runs", daemon=True)
        self._thread.start()
        self.engine = self._call(self._make(args, kwargs))

    async def _make(self, args: tuple, kwargs: dict) -> ProgramRuns:
        return ProgramRuns(*args, **kwargs)

    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> BlockingProgramRuns:
        """Start the pool."""
        self._call(self.engine.start())
        return self

    def run(self, request: RunRequest) -> tuple[RunResult, list[dict[str, Any]]]:
        """Run one request; returns its result and the events it emitted."""
        events: list[dict[str, Any]] = []
        return self._call(self.engine.run(request, events.append)), events

    def run_many(self, requests: list[RunRequest]) -> list[RunResult]:
        """Run requests concurrently on the pool."""
        async def all_() -> list[RunResult]:
            return await asyncio.gather(*(self.engine.run(r, lambda e: None) for r in requests))

        return self._call(all_())

    def submit(self, coro: Any) -> Any:
        """Run any coroutine on the engine's loop and wait for it."""
        return self._call(coro)

    def stop(self) -> None:
        """Stop the pool and the loop thread."""
        try:
            self._call(self.engine.stop(), timeout=60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> BlockingProgramRuns:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
