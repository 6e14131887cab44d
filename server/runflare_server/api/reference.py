"""Reference routes: languages, statuses, about, config_info, health, metrics."""

from __future__ import annotations

from dataclasses import asdict

from .. import __version__
from ..statuses import STATUSES
from .base import ApiError, BaseHandler


class LanguagesHandler(BaseHandler):
    def get(self) -> None:
        self.send([{"id": lang.id, "name": lang.name} for lang in self.service.languages if not lang.is_archived])


class AllLanguagesHandler(BaseHandler):
    def get(self) -> None:
        self.send([{"id": lang.id, "name": lang.name, "is_archived": lang.is_archived}
                   for lang in self.service.languages])


class LanguageHandler(BaseHandler):
    def get(self, language_id: str) -> None:
        for lang in self.service.languages:
            if lang.id == int(language_id):
                return self.send(asdict(lang))
        raise ApiError(404, {"error": "Not Found"})


class StatusesHandler(BaseHandler):
    def get(self) -> None:
        self.send([status.rest() for status in STATUSES.values()])


class AboutHandler(BaseHandler):
    def get(self) -> None:
        self.send({
            "version": __version__,
            "homepage": "https://github.com/run-flare/runflare",
            "source_code": "https://github.com/run-flare/runflare",
            "maintainer": "The Run-Flare developers",
        })


class ConfigInfoHandler(BaseHandler):
    def get(self) -> None:
        self.send(self.service.settings.config_info())


class HealthHandler(BaseHandler):
    async def get(self) -> None:
        health = await self.service.health()
        self.send(health, 200 if health["status"] == "ok" else 503)


class MetricsHandler(BaseHandler):
    """Prometheus metrics (text exposition format), behind the same X-Auth-Token as the API."""

    async def get(self) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST

        body = await self.service.metrics.render()
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(body)
