"""The service: wires settings, store, broker, engine, worker and the Tornado application together."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from tornado.httpserver import HTTPServer

from .broker import Broker, MemoryBroker
from .callbacks import Callbacks
from .config import Settings
from .engine.interface import Engine, LanguageInfo
from .models import DEFAULT_FIELDS, SubmissionRules, render
from .store import Store, open_store
from .submissions import Submissions
from .worker import Worker

log = logging.getLogger(__name__)


class Service:
    """One Run-Flare process (role all: API and worker)."""

    def __init__(self, settings: Settings, engine: Engine | None = None):
        self.settings = settings
        self.store: Store = open_store(str(settings.db_path))
        self.broker: Broker = MemoryBroker()
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
        self.worker: Worker | None = None
        self.http: HTTPServer | None = None

    async def start(self, listen: bool = True) -> None:
        if self.settings.role != "all":
            raise SystemExit("--role api|worker needs the shared (Redis) broker, which is not built yet; "
                             "use --role all")
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        await self.store.open()
        await self.engine.start()
        self.languages = sorted(self.engine.languages(), key=lambda lang: (lang.name.lower(), lang.id))
        self.language_names = {lang.id: lang.name for lang in self.languages}
        self.rules.language_ids = set(self.language_names)
        self.rules.kernelspecs = set(self.engine.kernelspecs())
        if self.settings.role in ("all", "worker"):
            self.worker = Worker(self.settings, self.store, self.broker, self.engine, self.callbacks,
                                 self.callback_body, self.settings.workers or os.cpu_count() or 1)
            await self.worker.recover()
            self.worker.start()
        if listen:
            from .api import make_app

            app = make_app(self)
            self.http = HTTPServer(app, xheaders=True, max_body_size=self.settings.max_body_size)
            self.http.listen(self.settings.port, self.settings.host)
            log.info("Run-Flare listening on http://%s:%d (data in %s)", self.settings.host,
                     self.settings.port, self.settings.data_dir)

    def callback_body(self, sub: dict[str, Any]) -> dict[str, Any]:
        """What a callback PUTs: the default fields, base64-encoded, as Judge0 does."""
        return render(sub, DEFAULT_FIELDS, True, self.language_names)

    async def stop(self) -> None:
        """Drain: stop listening, let running submissions finish (or leave them to re-queue), close the
        sockets (1001), stop the kernels, close the store last."""
        from .api.websocket import close_all_sockets

        if self.http is not None:
            self.http.stop()
        if self.worker is not None:
            await self.worker.stop()
        close_all_sockets()
        if self.http is not None:
            try:
                await asyncio.wait_for(self.http.close_all_connections(), 5)
            except asyncio.TimeoutError:
                log.warning("some connections did not close in time")
        await self.callbacks.drain()
        await self.engine.stop()
        await self.store.close()

    async def health(self) -> dict[str, Any]:
        store_ok = await self.store.ping()
        return {
            "status": "ok" if store_ok else "degraded",
            "queue_depth": await self.broker.depth(),
            "running": self.worker.busy if self.worker else 0,
            "workers": self.worker.concurrency if self.worker else 0,
            "store": {"kind": "sqlite", "reachable": store_ok},
            "broker": {"kind": "memory", "reachable": True},
            "engine": self.engine.health(),
            "languages": len(self.languages),
        }
