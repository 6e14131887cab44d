"""Prometheus metrics of one Run-Flare process, served at /metrics.

Counters and histograms are fed by the worker as runs finish; gauges (queue depth, pools, sockets) are read
from the service when Prometheus scrapes. Each service has its own registry, so several services in one
process (tests) do not mix their figures.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric, SummaryMetricFamily

from .statuses import STATUSES

RUN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40)


class ServiceMetrics:
    """The metrics of one service."""

    def __init__(self, service: Any):
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        self.runs = Counter("runflare_runs", "Finished submissions by status and language",
                            ["status", "language"], registry=self.registry)
        self.run_seconds = Histogram("runflare_run_duration_seconds", "Wall time from taken off the queue to "
                                     "finished, by kind of run", ["kind"], buckets=RUN_BUCKETS,
                                     registry=self.registry)
        self.sandbox_failures = Counter("runflare_sandbox_failures", "Runs that ended in Internal Error "
                                        "(a sandbox or kernel that failed on the server's side)", ["kind"],
                                        registry=self.registry)
        self.queue_depth = Gauge("runflare_queue_depth", "Submissions waiting in the queue (cluster-wide)",
                                 registry=self.registry)
        self.registry.register(_LiveState(service))

    def run_finished(self, sub: dict[str, Any], seconds: float) -> None:
        """Count a finished submission."""
        kind = (sub.get("session") or {}).get("kind", "program")
        status = STATUSES[sub["status_id"]].name
        language = str(sub.get("language_id") or sub.get("kernel") or "")
        self.runs.labels(status, language).inc()
        self.run_seconds.labels(kind).observe(seconds)
        if sub["status_id"] == 13:
            self.sandbox_failures.labels(kind).inc()

    async def render(self) -> bytes:
        """The text exposition format, with the queue depth read now (left out when the broker is down)."""
        try:
            self.queue_depth.set(await self.service.broker.depth())
        except Exception:
            self.queue_depth.set(float("nan"))
        return generate_latest(self.registry)


class _LiveState:
    """Gauges read from the service at scrape time: sockets, workers, kernel pools and their start costs."""

    def __init__(self, service: Any):
        self.service = service

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        service = self.service
        sockets = GaugeMetricFamily("runflare_websockets_open", "Open WebSocket connections")
        sockets.add_metric([], len(service.sockets))
        yield sockets
        worker = service.worker
        running = GaugeMetricFamily("runflare_runs_in_progress", "Submissions running in this process")
        running.add_metric([], worker.busy if worker else 0)
        yield running
        if worker is None:
            return
        health = service.engine.health()
        pool = GaugeMetricFamily("runflare_pool_kernels", "Kernels in each pool, by state",
                                 labels=["pool", "state"])
        starts = SummaryMetricFamily("runflare_kernel_start_seconds", "Kernel start wall time, per pool",
                                     labels=["pool"])
        failed = GaugeMetricFamily("runflare_kernel_start_failures", "Kernels that failed to start, per pool",
                                   labels=["pool"])
        target = GaugeMetricFamily("runflare_pool_target", "Ready kernels a kernel-run pool keeps now (it follows "
                                   "the arrival rate between its minimum and maximum)", labels=["pool", "bound"])
        program = health.get("program_runs") or {}
        if "kernels" in program:
            pool.add_metric(["program", "total"], program["kernels"])
            pool.add_metric(["program", "idle"], program.get("idle", 0))
        for name, stats in ((health.get("kernel_runs") or {}).get("pools") or {}).items():
            pool.add_metric([name, "ready"], stats.get("ready", 0))
            pool.add_metric([name, "starting"], stats.get("starting", 0))
            target.add_metric([name, "current"], stats.get("size", 0))
            target.add_metric([name, "min"], stats.get("min_size", 0))
            target.add_metric([name, "max"], stats.get("max_size", 0))
            started = stats.get("started", 0)
            starts.add_metric([name], started, started * stats.get("avg_start_wall_s", 0.0))
            failed.add_metric([name], stats.get("failed", 0))
        yield pool
        yield target
        yield starts
        yield failed
