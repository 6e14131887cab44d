"""The Tornado application: routes to thin handlers over the service's managers."""

from __future__ import annotations

from pathlib import Path

from tornado import web

from ..service import Service
from .access_log import ScrubbedRequestLogs, log_request
from .base import NotFoundHandler
from .openapi import OpenApiHandler
from .reference import (
    AboutHandler,
    AllLanguagesHandler,
    ConfigInfoHandler,
    HealthHandler,
    LanguageHandler,
    LanguagesHandler,
    MetricsHandler,
    StatusesHandler,
)
from .submissions import BatchHandler, SubmissionHandler, SubmissionsHandler
from .websocket import SubmissionSocket

STATIC = Path(__file__).resolve().parent.parent / "static"
TOKEN = r"([^/]+)"


class StaticFile(ScrubbedRequestLogs, web.RequestHandler):
    """One file of static/, served as is (no build step at run time)."""

    FILE = ""
    CONTENT_TYPE = ""

    def get(self) -> None:
        page = STATIC / self.FILE
        if not page.exists():
            raise web.HTTPError(404)
        self.set_header("Content-Type", self.CONTENT_TYPE)
        self.finish(page.read_bytes())


class HomeHandler(StaticFile):
    """The playground page at /."""

    FILE = "index.html"
    CONTENT_TYPE = "text/html; charset=UTF-8"


class EmbedHandler(StaticFile):
    """/embed.js: live code cells for any page (docs/embed.md)."""

    FILE = "embed.js"
    CONTENT_TYPE = "text/javascript; charset=UTF-8"


class EditorHandler(StaticFile):
    """/runflare-editor.js: CodeMirror 6, prebuilt by web/editor/build.sh (no npm at run time)."""

    FILE = "runflare-editor.js"
    CONTENT_TYPE = "text/javascript; charset=UTF-8"


# The route table: (OpenAPI path, URL pattern, handler). It serves the requests and, through
# openapi.build_openapi, is what /api/v1/openapi.json describes; order matters (first match wins).
ROUTES: list[tuple[str, str, type]] = [
    ("/", r"/", HomeHandler),
    ("/embed.js", r"/embed\.js", EmbedHandler),
    ("/runflare-editor.js", r"/runflare-editor\.js", EditorHandler),
    ("/api/v1/submissions", r"/api/v1/submissions/?", SubmissionsHandler),
    ("/api/v1/submissions/batch", r"/api/v1/submissions/batch/?", BatchHandler),
    ("/api/v1/submissions/{token}/ws", r"/api/v1/submissions/" + TOKEN + r"/ws/?", SubmissionSocket),
    ("/api/v1/submissions/{token}", r"/api/v1/submissions/" + TOKEN + r"/?", SubmissionHandler),
    ("/api/v1/languages", r"/api/v1/languages/?", LanguagesHandler),
    ("/api/v1/languages/all", r"/api/v1/languages/all/?", AllLanguagesHandler),
    ("/api/v1/languages/{id}", r"/api/v1/languages/(0|[1-9][0-9]*)/?", LanguageHandler),
    ("/api/v1/statuses", r"/api/v1/statuses/?", StatusesHandler),
    ("/api/v1/about", r"/api/v1/about/?", AboutHandler),
    ("/api/v1/config_info", r"/api/v1/config_info/?", ConfigInfoHandler),
    ("/api/v1/health", r"/api/v1/health/?", HealthHandler),
    ("/api/v1/openapi.json", r"/api/v1/openapi.json", OpenApiHandler),
    ("/metrics", r"/metrics", MetricsHandler),
]


WORKER_ROUTES = {HealthHandler, MetricsHandler}  # what a --role worker process serves


def make_app(service: Service) -> web.Application:
    routes = [(pattern, handler) for _, pattern, handler in ROUTES
              if service.settings.role != "worker" or handler in WORKER_ROUTES]
    return web.Application(routes, service=service, default_handler_class=NotFoundHandler,
                           log_function=log_request)
