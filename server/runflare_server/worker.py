"""The worker: takes submissions from the queue, runs them through the engine, records and publishes events."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from . import events
from .broker import Broker
from .callbacks import Callbacks
from .config import Settings
from .engine.incidents import incident
from .engine.interface import Engine, Event, Limits, RunRequest, RunResult
from .statuses import ACCEPTED, IN_QUEUE, PROCESSING, status_of
from .store import Store

log = logging.getLogger(__name__)


def limits_of(sub: dict[str, Any], settings: Settings) -> Limits:
    return Limits(
        cpu_time_limit=float(sub["cpu_time_limit"]),
        cpu_extra_time=float(sub["cpu_extra_time"]),
        wall_time_limit=float(sub["wall_time_limit"]),
        memory_limit=int(sub["memory_limit"]),
        stack_limit=int(sub["stack_limit"]),
        max_processes_and_or_threads=int(sub["max_processes_and_or_threads"]),
        max_file_size=int(sub["max_file_size"]),
        enable_network=bool(sub["enable_network"]),
        enable_per_process_and_thread_time_limit=bool(sub["enable_per_process_and_thread_time_limit"]),
        enable_per_process_and_thread_memory_limit=bool(sub["enable_per_process_and_thread_memory_limit"]),
        max_output_bytes=settings.max_output_size,
    )


def compile_limits_of(settings: Settings) -> Limits:
    """The compile step's limits: the server's maxima (Judge0 compiles with them), lowered where the
    ``compile_limits`` setting says so, never raised above them."""
    maxima: dict[str, Any] = {
        "cpu_time_limit": settings.max_cpu_time_limit, "cpu_extra_time": settings.max_cpu_extra_time,
        "wall_time_limit": settings.max_wall_time_limit, "memory_limit": settings.max_memory_limit,
        "stack_limit": settings.max_stack_limit, "max_file_size": settings.max_max_file_size,
        "max_processes_and_or_threads": settings.max_max_processes_and_or_threads,
    }
    for name, value in settings.compile_limits.items():
        if name in maxima:
            maxima[name] = min(type(maxima[name])(value), maxima[name])
    return Limits(**maxima, max_output_bytes=64 * 1024)


def combine(results: list[RunResult]) -> RunResult:
    """Judge0's number_of_runs: the last run's outcome, time and memory averaged."""
    last = results[-1]
    for name in ("time", "wall_time", "memory"):
        values = [getattr(r, name) for r in results if getattr(r, name) is not None]
        if values:
            mean = sum(values) / len(values)
            setattr(last, name, round(mean) if name == "memory" else mean)
    return last


class Worker:
    """Runs up to `concurrency` submissions at once."""

    def __init__(self, settings: Settings, store: Store, broker: Broker, engine: Engine,
                 callbacks: Callbacks, render_callback: Any, concurrency: int):
        self.settings = settings
        self.store = store
        self.broker = broker
        self.engine = engine
        self.callbacks = callbacks
        self.render_callback = render_callback
        self.concurrency = concurrency
        self._loops: list[asyncio.Task] = []
        self._running: dict[str, asyncio.Task] = {}
        self._stopping = False

    async def recover(self) -> int:
        """Re-queue what a previous process left queued or running."""
        tokens = await self.store.unfinished()
        for token in tokens:
            sub = await self.store.get(token)
            if sub and sub["status_id"] != IN_QUEUE:
                sub["status_id"] = IN_QUEUE
                await self.store.update(token, {"status_id": IN_QUEUE})
            await self.broker.publish(token, events.status_update(token, sub or {"status_id": IN_QUEUE}))
            await self.broker.enqueue(token)
        if tokens:
            log.info("re-queued %d unfinished submissions", len(tokens))
        return len(tokens)

    def start(self) -> None:
        self._loops = [asyncio.create_task(self._loop()) for _ in range(self.concurrency)]

    @property
    def busy(self) -> int:
        return len(self._running)

    async def stop(self, drain_timeout: float = 20.0) -> None:
        """Take no new work; let running submissions finish for up to drain_timeout (the rest re-queue on start)."""
        self._stopping = True
        idle = [t for t in self._loops if t not in self._running.values()]
        for task in idle:
            task.cancel()
        if self._running:
            await asyncio.wait(list(self._running.values()), timeout=drain_timeout)
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)

    async def _loop(self) -> None:
        while not self._stopping:
            token = await self.broker.dequeue()
            if self._stopping:
                await self.broker.enqueue(token)
                return
            self._running[token] = asyncio.current_task()  # type: ignore[assignment]
            try:
                await self.process(token)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                message = incident(log, "internal error in the worker", exc=exc, detail=token)
                try:
                    await self._fail(token, message)
                except Exception:
                    log.exception("could not record the failure of %s", token)
            finally:
                self._running.pop(token, None)
                await self.broker.ack(token)

    async def process(self, token: str) -> None:
        sub = await self.store.get(token)
        if sub is None or sub["status_id"] not in (IN_QUEUE, PROCESSING):
            return
        started = {"status_id": PROCESSING}
        await self.store.update(token, started)
        sub.update(started)
        await self.broker.publish(token, events.status_update(token, sub))

        results: list[RunResult] = []
        stdin_queue = self.broker.open_input(token) if sub.get("interactive") else None
        try:
            for run in range(int(sub.get("number_of_runs") or 1)):
                result = await self._run_once(sub, stdin_queue, live=run == 0)
                results.append(result)
                if status_of(result, sub.get("expected_output")) != ACCEPTED:
                    break
        finally:
            if stdin_queue is not None:
                self.broker.close_input(token)
        await self._finish(token, sub, combine(results))

    async def _run_once(self, sub: dict[str, Any], stdin_queue: asyncio.Queue | None, live: bool) -> RunResult:
        """One run. Only the first of number_of_runs streams its output (the others would repeat it)."""
        token = sub["token"]
        request = RunRequest(
            token=token, source_code=sub["source_code"], language_id=sub.get("language_id"),
            kernel=sub.get("kernel"), stdin=sub.get("stdin"), compiler_options=sub.get("compiler_options"),
            command_line_arguments=sub.get("command_line_arguments"),
            redirect_stderr_to_stdout=bool(sub.get("redirect_stderr_to_stdout")),
            limits=limits_of(sub, self.settings), compile_limits=compile_limits_of(self.settings),
            stdin_queue=stdin_queue,
        )

        display_budget = self.settings.max_output_size

        async def emit(event: Event) -> None:
            nonlocal display_budget
            kind = event.get("kind")
            if not live and kind != "stage":
                return
            if kind == "stage":
                message = events.progress(token, event["stage"], event.get("message"))
            elif kind == "stream":
                message = events.message("progress_update", token, stage="running",
                                         stream=event["stream"], text=event["text"])
            elif kind == "display":
                display_budget -= len(json.dumps(event.get("data", {})))
                if display_budget < 0:
                    return
                message = events.message("progress_update", token, stage="running",
                                         display={"data": event["data"], "metadata": event.get("metadata", {})})
            else:
                return
            await self.broker.publish(token, message)

        try:
            return await self.engine.run(request, emit)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the details go to the log only (under the incident id)
            return RunResult(outcome="internal", message=incident(log, "engine failure", exc=exc, detail=token))

    async def _finish(self, token: str, sub: dict[str, Any], result: RunResult) -> None:
        outputs, kept = [], 0
        for output in result.outputs:
            kept += len(json.dumps(output))
            if kept > self.settings.max_output_size:
                result.message = "; ".join(filter(None, [result.message, "rich outputs truncated"]))
                break
            outputs.append(output)
        changes = {
            "status_id": status_of(result, sub.get("expected_output")),
            "stdout": result.stdout, "stderr": result.stderr, "compile_output": result.compile_output,
            "message": result.message, "exit_code": result.exit_code, "exit_signal": result.exit_signal,
            "time": result.time, "wall_time": result.wall_time, "memory": result.memory,
            "outputs": outputs, "finished_at": time.time(),
        }
        await self.store.update(token, changes)
        sub.update(changes)
        await self.broker.publish(token, events.progress(token, "finished"))
        await self.broker.publish(token, events.status_update(token, sub), final=True)
        if sub.get("callback_url"):
            try:
                self.callbacks.send(sub["callback_url"], self.render_callback(sub))
            except Exception:
                log.exception("callback for %s not sent", token)

    async def _fail(self, token: str, message: str) -> None:
        sub = await self.store.get(token)
        if sub is None or sub["status_id"] > PROCESSING:
            return
        await self._finish(token, sub, RunResult(outcome="internal", message=message))
