"""The worker: takes submissions from the queue, runs them through the engine, records and publishes events."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from typing import Any

from . import events
from .broker import Broker
from .broker.base import BrokerUnavailable, InputChannel, Job
from .callbacks import Callbacks
from .config import Settings
from .engine.incidents import incident
from .engine.interface import Engine, Event, Limits, RunRequest, RunResult
from .event_sender import EventSender
from .statuses import ACCEPTED, IN_QUEUE, PROCESSING, is_final, status_of
from .store import Store
from .store.base import StoreUnavailable
from .submission import Submission

TRANSIENT = (StoreUnavailable, BrokerUnavailable)

log = logging.getLogger(__name__)


def limits_of(sub: Submission, settings: Settings) -> Limits:
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
                 callbacks: Callbacks, render_callback: Any, concurrency: int, metrics: Any = None):
        self.settings = settings
        self.store = store
        self.broker = broker
        self.engine = engine
        self.callbacks = callbacks
        self.render_callback = render_callback
        self.concurrency = concurrency
        self.metrics = metrics  # a ServiceMetrics, told of each finished run
        self._loops: list[asyncio.Task] = []
        self._running: dict[str, asyncio.Task] = {}
        self._untracked: dict[str, float] = {}  # token -> when reconcile first found it untracked
        self._stopping = False

    async def recover(self) -> int:
        """At start: queue again what is unfinished in the store and not in the queue (a previous process
        left it queued or running). Only the in-process broker does it at once: with a shared broker, an API
        node may have stored a submission it has not queued yet, so the periodic reconcile's grace applies."""
        if self.broker.kind != "memory":
            return 0
        return await self.reconcile(grace=0.0)

    async def reconcile(self, grace: float) -> int:
        """Queue again the unfinished submissions the broker does not track (queued, or held by a live
        worker) once they have been untracked for `grace` seconds: a broker that lost its data (a Redis
        restart) loses nothing accepted. One worker of the cluster reconciles at a time."""
        if not await self.broker.try_lock("reconcile", max(grace, 5.0)):
            return 0
        tracked = await self.broker.tracked() | set(self._running)
        now = time.monotonic()
        unfinished = set(await self.store.unfinished())
        self._untracked = {t: since for t, since in self._untracked.items() if t in unfinished}
        requeued = 0
        for token in sorted(unfinished - tracked):
            first_seen = self._untracked.setdefault(token, now)
            if now - first_seen < grace:
                continue
            sub = await self.store.get(token)
            if sub is None or is_final(sub["status_id"]):
                continue
            if sub["status_id"] != IN_QUEUE:
                sub = await self.store.update(token, {"status_id": IN_QUEUE}) or sub
            await self.broker.announce(token, [events.status_update(token, sub)])
            self._untracked.pop(token, None)
            requeued += 1
        if requeued:
            log.info("re-queued %d unfinished submissions", requeued)
        return requeued

    async def _reconcile_loop(self) -> None:
        interval = self.settings.reconcile_interval
        while not self._stopping:
            await asyncio.sleep(interval)
            try:
                await self.reconcile(grace=self.settings.visibility_timeout)
            except TRANSIENT as exc:
                log.warning("reconcile skipped: %s", exc)
            except Exception:
                log.exception("reconcile failed")

    def start(self) -> None:
        self._loops = [asyncio.create_task(self._loop()) for _ in range(self.concurrency)]
        if self.broker.kind != "memory":  # an in-process queue cannot lose what this process holds
            self._loops.append(asyncio.create_task(self._reconcile_loop()))

    @property
    def busy(self) -> int:
        return len(self._running)

    async def stop(self, drain_timeout: float = 20.0) -> None:
        """Take no new work; let running submissions finish for up to drain_timeout (the rest re-queue on start)."""
        self._stopping = True
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        jobs = list(self._running.values())
        if jobs:
            await asyncio.wait(jobs, timeout=drain_timeout)
        for task in jobs:
            task.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

    async def _loop(self) -> None:
        """Take a job and run it; once its run is over (the engine is free again), take the next one while
        the first one's result is being stored. So a loop holds at most one run and one result being stored,
        and the engine does not wait for the store between runs."""
        backoff = Backoff()
        storing: asyncio.Task | None = None
        while not self._stopping:
            try:
                job = await self.broker.dequeue()
            except TRANSIENT as exc:
                log.warning("queue unavailable: %s", exc)
                await backoff.sleep()
                continue
            backoff.reset()
            if self._stopping:
                await self.broker.enqueue(job.token)
                await self.broker.ack(job)
                return
            ran = asyncio.Event()
            task = asyncio.create_task(self._handle(job, ran))
            self._running[job.token] = task
            task.add_done_callback(lambda done, token=job.token: self._forget(token, done))
            await ran.wait()
            if storing is not None:
                await asyncio.wait([storing])
            storing = task

    def _forget(self, token: str, task: asyncio.Task) -> None:
        if self._running.get(token) is task:
            del self._running[token]

    async def _handle(self, job: Job, ran: asyncio.Event | None = None) -> None:
        """Run the job and acknowledge it once its final state is stored. While the store or the broker is
        down the job stays held (not acknowledged) and is retried; it is never dropped. `ran` is set once the
        run is over (or never happens), before its result is stored."""
        ran = ran or asyncio.Event()
        try:
            await self._process_and_store(job, ran)
        finally:
            ran.set()
        backoff = Backoff()
        while True:
            try:
                await self.broker.ack(job)
                return
            except TRANSIENT:
                await backoff.sleep()

    async def _process_and_store(self, job: Job, ran: asyncio.Event) -> None:
        backoff = Backoff()
        while True:
            try:
                if job.attempt > self.settings.max_attempts:
                    ran.set()
                    await self._fail(job.token, f"gave up after {job.attempt - 1} attempts: each run stopped "
                                                "the worker that ran it")
                else:
                    await self.process(job.token, ran)
                break
            except asyncio.CancelledError:
                raise
            except TRANSIENT as exc:
                log.warning("%s: %s; retrying", job.token, exc)
                await backoff.sleep()
            except Exception as exc:
                message = incident(log, "internal error in the worker", exc=exc, detail=job.token)
                ran.set()
                try:
                    await self._fail(job.token, message)
                except Exception:
                    log.exception("could not record the failure of %s", job.token)
                break

    async def process(self, token: str, ran: asyncio.Event | None = None) -> None:
        """Run one submission and store its result; `ran` is set between the two."""
        sub = await self.store.get(token)
        if sub is None or is_final(sub["status_id"]):
            return
        taken_at = time.monotonic()
        sender = EventSender(self.broker, token)
        try:
            await self._run_and_finish(sub, sender, ran)
        except Exception:
            await sender.drain()  # what it still sends comes before a retry's events or the failure's
            raise
        if self.metrics is not None:
            self.metrics.run_finished(sub, time.monotonic() - taken_at)

    async def _run_and_finish(self, sub: Submission, sender: EventSender, ran: asyncio.Event | None) -> None:
        token = sub["token"]
        sub["status_id"] = PROCESSING
        await sender.emit(events.status_update(token, sub))
        stored = asyncio.ensure_future(self._store_processing(token))
        results: list[RunResult] = []
        try:
            stdin: InputChannel | None = await self.broker.open_input(token) if sub.get("interactive") else None
            try:
                for run in range(int(sub.get("number_of_runs") or 1)):
                    result = await self._run_once(sub, stdin, sender, live=run == 0)
                    results.append(result)
                    if status_of(result, sub.get("expected_output")) != ACCEPTED:
                        break
            finally:
                if stdin is not None:
                    await stdin.close()
        finally:
            await stored
        if ran is not None:
            ran.set()
        await self._finish(token, sub, combine(results), sender)

    async def _store_processing(self, token: str) -> None:
        """Store "Processing" while the run starts (the engine does not wait for the commit; the event is
        already out, and replays come from the event log). The final result is stored whatever happens here,
        after this write, so a store that is down costs only this status."""
        try:
            await self.store.update(token, {"status_id": PROCESSING})
        except Exception as exc:  # noqa: BLE001 - the run goes on; its final write is retried until stored
            log.warning("%s: processing status not stored: %s", token, exc)

    async def _run_once(self, sub: Submission, stdin_queue: InputChannel | None, sender: EventSender,
                        live: bool) -> RunResult:
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
            await sender.emit(message)

        try:
            return await self.engine.run(request, emit)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the details go to the log only (under the incident id)
            return RunResult(outcome="internal", message=incident(log, "engine failure", exc=exc, detail=token))

    async def _finish(self, token: str, sub: Submission, result: RunResult, sender: EventSender | None = None) -> None:
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
        backoff = Backoff()
        while True:  # the run is done: only its result is retried, never the run
            try:
                stored = await self.store.update(token, changes)
                break
            except StoreUnavailable as exc:
                log.warning("result of %s not stored yet: %s; retrying", token, exc)
                await backoff.sleep()
        sub.update(changes)  # type: ignore[typeddict-item]
        sender = sender or EventSender(self.broker, token)
        await sender.close(events.progress(token, "finished"), events.status_update(token, sub), result=stored)
        if sub.get("callback_url"):
            try:
                self.callbacks.send(sub["callback_url"], self.render_callback(sub))
            except Exception:
                log.exception("callback for %s not sent", token)

    async def _fail(self, token: str, message: str) -> None:
        sub = await self.store.get(token)
        if sub is None or is_final(sub["status_id"]):
            return
        await self._finish(token, sub, RunResult(outcome="internal", message=message))


class Backoff:
    """Exponential backoff with jitter for retrying a store or broker that is down: 0.1 s up to 5 s."""

    def __init__(self, first: float = 0.1, cap: float = 5.0):
        self.first, self.cap, self.delay = first, cap, first

    def reset(self) -> None:
        self.delay = self.first

    async def sleep(self) -> None:
        await asyncio.sleep(self.delay * random.uniform(0.5, 1.0))
        self.delay = min(self.cap, self.delay * 2)
