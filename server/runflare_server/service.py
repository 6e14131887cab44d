"""The service: wires settings, store, broker, engine, worker and the Tornado application together.

Roles: ``all`` (API and worker in one process, the default), ``api`` (HTTP and WebSocket only) and
``worker`` (runs submissions; serves only health). ``api`` and ``worker`` share a PostgreSQL store and a
Redis broker with any number of other processes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import asdict
from typing import Any

from tornado.httpserver import HTTPServer

from .broker import Broker, open_broker
from .callbacks import Callbacks
from .config import Settings
from .engine.interface import Engine, LanguageInfo
from .fanout import Fanouts
from .metrics import ServiceMetrics
from .models import DEFAULT_FIELDS, SubmissionRules, render
from .sockets import SocketRegistry
from .store import Store, open_store
from .submission import Submission
from .submissions import Submissions
from .worker import Worker

log = logging.getLogger(__name__)


class Service:
    """One Run-Flare process."""

    def __init__(self, settings: Settings, engine: Engine | None = None):
        self.settings = settings
        if settings.role != "all" and settings.broker == "memory":
            raise SystemExit(f"--role {settings.role} needs a broker shared between processes: "
                             "--broker redis://HOST:PORT (and a shared --store postgresql://...)")
        self.store: Store = open_store(settings.store_url)
        self.broker: Broker = open_broker(settings)
        if engine is None:
            from .engine.manager import KernelEngine

            engine = KernelEngine(settings)
        self.engine = engine
        self.callbacks = Callbacks(settings.callbacks_max_tries, settings.callbacks_timeout,
                                   allowed_networks=settings.callback_allowed_networks)
        self.languages: list[LanguageInfo] = []
        self.language_names: dict[int, str] = {}
        self.rules = SubmissionRules(settings, set(), set())
        self.submissions = Submissions(settings, self.store, self.broker, self.rules)
        self.sockets = SocketRegistry(settings.ws_idle_timeout, settings.ws_send_timeout, settings.ws_ping_interval)
        self.fanouts = Fanouts(self.broker)
        self.metrics = ServiceMetrics(self)
        self.worker: Worker | None = None
        self.http: HTTPServer | None = None
        self.started_at = time.time()
        self._catalog_task: asyncio.Task | None = None

    @property
    def runs_submissions(self) -> bool:
        return self.settings.role in ("all", "worker")

    async def start(self, listen: bool = True) -> None:
        if not self.settings.store:  # the embedded default lives in data_dir
            self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        await self.store.open()
        await self.broker.open()
        if self.runs_submissions:
            await self.engine.start()
        await self.refresh_catalog()
        self._catalog_task = asyncio.create_task(self._catalog_loop())
        if self.runs_submissions:
            self.worker = Worker(self.settings, self.store, self.broker, self.engine, self.callbacks,
                                 self.callback_body, self.settings.workers or os.cpu_count() or 1,
                                 metrics=self.metrics)
            await self.worker.recover()
            self.worker.start()
        if listen:
            from .api import make_app

            app = make_app(self)
            self.http = HTTPServer(app, xheaders=self.settings.trust_xheaders, max_body_size=self.settings.max_body_size)
            self.http.listen(self.settings.port, self.settings.host)
            log.info("Run-Flare (%s) listening on http://%s:%d (store %s, broker %s)", self.settings.role,
                     self.settings.host, self.settings.port, self.store.kind, self.broker.kind)

    async def refresh_catalog(self) -> None:
        """The languages and kernelspecs submissions may name: a worker offers its engine's and tells the
        cluster; an API node takes what the workers said (its own host may have no toolchain at all)."""
        if self.runs_submissions:
            languages, kernelspecs = self.engine.languages(), self.engine.kernelspecs()
            await self.broker.set_catalog({"languages": [asdict(lang) for lang in languages],
                                           "kernelspecs": kernelspecs})
        else:
            catalog = await self.broker.catalog()
            if catalog is None and self.languages:
                return  # the broker lost it (a Redis restart): keep ours until a worker says it again
            catalog = catalog or {"languages": [], "kernelspecs": []}
            languages = [LanguageInfo(**lang) for lang in catalog["languages"]]
            kernelspecs = catalog["kernelspecs"]
        self.languages = sorted(languages, key=lambda lang: (lang.name.lower(), lang.id))
        self.language_names = {lang.id: lang.name for lang in self.languages}
        self.rules.language_ids = set(self.language_names)
        self.rules.kernelspecs = set(kernelspecs)

    async def _catalog_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reconcile_interval)
            try:
                await self.refresh_catalog()
            except Exception as exc:  # a broker briefly down: the last catalog stays
                log.warning("language catalog not refreshed: %s", exc)

    def callback_body(self, sub: Submission) -> dict[str, Any]:
        """What a callback PUTs: the default fields, base64-encoded, as Judge0 does."""
        return render(sub, DEFAULT_FIELDS, True, self.language_names)

    async def stop(self) -> None:
        """Drain: stop listening, let running submissions finish (or leave them to re-queue), close the
        sockets (1001), stop the kernels, close the broker and the store last."""
        if self.http is not None:
            self.http.stop()
        if self._catalog_task is not None:
            self._catalog_task.cancel()
        if self.worker is not None:
            await self.worker.stop()
        self.sockets.close_all()
        if self.http is not None:
            try:
                await asyncio.wait_for(self.http.close_all_connections(), 5)
            except asyncio.TimeoutError:
                log.warning("some connections did not close in time")
        await self.callbacks.drain()
        if self.runs_submissions:
            await self.engine.stop()
        await self.broker.close()
        await self.store.close()

    async def health(self) -> dict[str, Any]:
        """Each dependency's state; `status` is "ok" only when all of them answer."""
        store_ok, broker_ok = await asyncio.gather(self.store.ping(), self.broker.ping())
        try:
            depth: int | None = await self.broker.depth() if broker_ok else None
        except Exception:
            depth = None
        return {
            "status": "ok" if store_ok and broker_ok else "degraded",
            "role": self.settings.role,
            "queue_depth": depth,
            "running": self.worker.busy if self.worker else 0,
            "workers": self.worker.concurrency if self.worker else 0,
            "websockets": len(self.sockets),
            "store": {"kind": self.store.kind, "reachable": store_ok},
            "broker": {"kind": self.broker.kind, "reachable": broker_ok},
            "engine": self.engine.health() if self.runs_submissions else None,
            "languages": len(self.languages),
        }
